"""Atomic, verified checkpoints with exact resume.

Two layouts share the atomic step directories, the manifest and the checks below.

Sharded (``save_checkpoint(..., sharded=True)``, the native trainer's), ``<folder>/step-00000N/``::

    dcp/            torch.distributed.checkpoint (DCP) of {"model": ..., "optim": ...}: every rank writes its
                    own shards (``__<rank>_<i>.distcp``; replicated tensors once), rank 0 the ``.metadata``.
                    The state dicts come from ``get_state_dict`` / go back with ``set_state_dict``
                    (torch.distributed.checkpoint.state_dict), so FSDP2/TP DTensors stay sharded and a
                    checkpoint written by one layout loads into another (DCP re-shards on load):
                    https://pytorch.org/docs/stable/distributed.checkpoint.html
    train.json, rank-R.pt, manifest.json   as below; the manifest has "layout": "dcp" and lists the shards

``async_save=True`` (``training.checkpoint.async_mode``) writes the shards with ``dcp.async_save`` in the
background (on a separate gloo process group, as the DCP docs recommend) while training continues; the
step directory is completed (hashes, manifest, rename, pruning) by the next save or by
:func:`wait_for_checkpoint`, which every rank calls before it reads a checkpoint or exits.

Full (default; DeepSpeed and post-training), ``<folder>/step-00000N/``::

    model.pt        full (unsharded) model state dict, torchtitan FQNs, written by rank 0
    optimizer.pt    full optimizer state dict keyed by FQN (torch.distributed.checkpoint.state_dict)
    train.json      step, tokens, scheduler, data-loader position, loss window, rewinds
    rank-R.pt       per-rank RNG states (python, numpy, torch CPU, CUDA)
    manifest.json   {"format", "step", "world", "files": {name: {"bytes", "sha256"}}} -- written last

Full layout: state is GATHERED to full tensors on rank 0 (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``) instead of sharded DCP.
The native trainer targets small models; full checkpoints are layout-independent (resume a DDP run
with FSDP2 or TP), and post-training/DeepSpeed code loads ``model.pt`` with a plain
``load_state_dict``. Loading re-shards with ``set_model_state_dict`` / ``set_optimizer_state_dict``.
(For models that do not fit one host, use the torchtitan backend, whose DCP checkpoints are sharded.)

Atomicity: everything goes to ``step-N.tmp/``; files are fsynced; rank 0 writes the manifest with the
sha256 of every file, fsyncs, renames the folder to ``step-N`` and fsyncs the parent. A crash leaves at
worst a ``.tmp`` folder, which is never loaded. On load every file is checked against the manifest;
a mismatch raises :class:`CheckpointError` with a one-line message naming the file. By default the
newest checkpoint must verify (refuse, do not silently fall back); ``fallback=True`` walks back to the
newest complete one. Pruning (``keep_latest``) runs only after the new folder is in place and deletes only
checkpoints of earlier steps (:func:`prune_older`); a second save of a step replaces the old folder only once
the new one is complete.

Before loading, the checkpoint's tensor names and shapes are compared with the model's (:func:`check_shapes`:
the DCP metadata or a memory-mapped ``model.pt``, nothing loaded), so a checkpoint of another model is refused
with one line naming the first mismatching tensor and both shapes, not with torch's size-mismatch traceback
from inside the load.

Untrusted files: every file is read with ``torch.load(weights_only=True)`` (:func:`safe_load`); a DCP ``.metadata``
with only DCP's own classes allowed (:func:`check_dcp_metadata`: DCP reads it with ``pickle.load``), and every DCP load
(:func:`dcp_load`) with :func:`weights_only_load_planner`, which reads the non-tensor entries (an optimizer's
``param_groups`` values) with ``weights_only=True`` where torch's ``DefaultLoadPlanner`` says ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from llmc.fileio import sha256_file
from llmc.runtime.errors import CheckpointError  # (defined without torch, for prepare / check)

FORMAT = 1


# ----------------------------------------------------------------------------- small helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _publish(tmp: Path, final: Path, folder: Path, manifest: dict, keep_latest: int | None) -> None:
    """Rank 0: write the manifest, atomically rename the finished step folder into place, prune old ones."""
    _write_json(manifest, tmp / "manifest.json")
    _fsync_dir(tmp)
    replaced = None
    if final.exists():  # a save of a step that has one already: the old folder goes only once the new one is in place
        replaced = final.with_name(final.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(folder)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if keep_latest:
        prune_older(folder, int(manifest["step"]), keep_latest)


def prune_older(folder: Path, step: int, keep_latest: int) -> list[Path]:
    """Delete the oldest ``step-N`` folders so that ``keep_latest`` remain of those up to ``step`` (the one just
    completed included); returns what went. Only folders of earlier steps are candidates: one of a later step (left
    by another run of the stage) is never taken for older, and the one just written is never pruned in its place.
    Each is renamed (``step-N.pruned``) before it is deleted, so a deletion cut short never leaves a partial
    ``step-N``."""
    done = [p for s, p in list_checkpoints(folder) if s <= step]
    gone = done[:-keep_latest] if keep_latest > 0 else []
    for old in gone:
        doomed = old.with_name(old.name + ".pruned")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return gone


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """This rank's RNG states, in values ``torch.load(weights_only=True)`` reads: Python's ``random.getstate()`` (a
    tuple of ints), NumPy's legacy global generator as :func:`_numpy_state` (MT19937: plain ints and an int64 tensor
    of its 624-word key, not the pickled ``ndarray`` of ``np.random.get_state()``), torch's CPU and CUDA states
    (uint8 tensors)."""
    st = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _numpy_state() -> dict:
    """``np.random.get_state(legacy=False)`` (``{"bit_generator": "MT19937", "state": {"key": uint32[624], "pos"},
    "has_gauss", "gauss"}``: https://numpy.org/doc/stable/reference/random/generated/numpy.random.get_state.html)
    with the key as an int64 tensor, so that no NumPy object is pickled."""
    st = np.random.get_state(legacy=False)
    return {"bit_generator": str(st["bit_generator"]), "key": torch.from_numpy(st["state"]["key"].astype(np.int64)),
            "pos": int(st["state"]["pos"]), "has_gauss": int(st["has_gauss"]), "gauss": float(st["gauss"])}


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    npst = st["numpy"]
    if isinstance(npst, dict):  # this format (_numpy_state)
        npst = {"bit_generator": npst["bit_generator"],
                "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]}
    np.random.set_state(npst)  # (an earlier llmc's: the tuple np.random.get_state() returns)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _legacy_rank_globals() -> list:
    """The only globals a ``rank-R.pt`` of an earlier llmc pickles beyond what ``weights_only=True`` allows: the
    ``ndarray`` (uint32) of ``np.random.get_state()``'s tuple, rebuilt by ``numpy._core.multiarray._reconstruct``
    (``numpy.core.multiarray`` when NumPy 1.x wrote it). Allowed for that one file, with torch's
    ``torch.serialization.safe_globals`` (https://pytorch.org/docs/stable/notes/serialization.html#weights-only),
    never ``weights_only=False``."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # (NumPy 1.x)
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


#: what a refused file's line ends with
UNSAFE_HINT = ("hint: llmc writes only tensors and plain values; delete the checkpoint if you did not write it, or "
               "move its folder aside to start over")


def safe_load(path: str | Path, *, legacy: list | tuple = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values only, never code
    (https://pytorch.org/docs/stable/notes/serialization.html#weights-only). ``legacy``: globals also allowed when
    the plain load refuses (an earlier llmc's format), through ``torch.serialization.safe_globals``. A file that
    still needs others is refused: :class:`CheckpointError`, one line naming the file, the globals it asks for and
    :data:`UNSAFE_HINT`; nothing in it ran."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if legacy:
            try:
                with torch.serialization.safe_globals(list(legacy)):
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError:
                pass
    raise CheckpointError(unsafe_message(path)) from None


def unsafe_message(path: str | Path) -> str:
    """The one line for a file ``torch.load(weights_only=True)`` refuses (the globals it names, as torch lists them)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 (not even a torch zip file: said as such)
        names = []
    what = (f"it pickles {', '.join(sorted(names)[:4])}{' ...' if len(names) > 4 else ''}" if names
            else "it is not a file torch.load(weights_only=True) reads")
    return f"checkpoint {path}: refusing to load it: {what}, which could run code when read ({UNSAFE_HINT})"


def _rank_payload(rank_state: dict | None) -> dict:
    """What ``rank-R.pt`` holds: this rank's RNG states, plus the caller's per-rank ``extra`` state if any."""
    return {**rng_state(), "extra": rank_state} if rank_state is not None else rng_state()


def _frozen_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that do not train (what ``ignore_frozen_params`` leaves out of a state dict)."""
    return {n for n, p in _unwrap(model).named_parameters() if not p.requires_grad}


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def read_model_state(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model state dict of a verified ``step-N`` folder, on CPU, in one process: ``model.pt``, or
    the ``model`` entries of its DCP shards (loaded without a process group; the optimizer's never read). ``dtype``:
    floating-point tensors come back in it (an export's bf16: half the host memory of the fp32 they were saved in)."""
    path = Path(path)
    if (path / "model.pt").exists():
        sd = safe_load(path / "model.pt")
        return sd if dtype is None else {k: _as_dtype(v, dtype) for k, v in sd.items()}
    if not (path / "dcp" / ".metadata").exists():
        raise CheckpointError(f"checkpoint {path}: neither model.pt nor dcp/.metadata")
    sd = read_dcp_tensors(path / "dcp", lambda key: key.startswith("model."), dtype)
    return {k[len("model."):]: v for k, v in sd.items()}


def _as_dtype(t, dtype: torch.dtype | None):
    """``t`` in ``dtype`` when it is a real floating-point tensor (integer and complex ones keep theirs)."""
    if dtype is None or not torch.is_tensor(t) or not t.is_floating_point():
        return t
    return t.to(dtype)


def read_dcp_tensors(dcp_dir: str | Path, want, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.distributed.checkpoint`` folder whose flattened key ``want(key)`` accepts, whole, on
    CPU, in one process (no process group), each read straight into a tensor of its own (in ``dtype`` when given
    and the stored one is real floating point: DCP's reader copies each stored chunk into its destination,
    ``FileSystemReader.read_data``). Only those keys' bytes are read and held: a training checkpoint's optimizer
    state (two fp32 moments per parameter) is never loaded to export its model, nor written to a temporary file as
    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` does (https://pytorch.org/docs/stable/
    distributed.checkpoint.html)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_dcp_metadata(dcp_dir)
    reader = FileSystemReader(str(dcp_dir))
    md = reader.read_metadata().state_dict_metadata
    sd: dict[str, torch.Tensor] = {}
    for key, m in md.items():
        if isinstance(m, TensorStorageMetadata) and want(key):
            real = m.properties.dtype.is_floating_point and not m.properties.dtype.is_complex
            sd[key] = torch.empty(tuple(m.size), dtype=dtype if dtype is not None and real else m.properties.dtype)
    if sd:
        import warnings

        with warnings.catch_warnings():  # (its "assuming the intent is to load in a single process": it is)
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp_load(sd, dcp_dir, storage_reader=reader, no_dist=True)
    return sd


def deepspeed_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle beyond tensors and plain values (DeepSpeed 0.19.8, every ZeRO stage:
    the loss scaler, the ZeRO stage enum and the optimizer's fragment addresses, as
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` lists them): data holders that run nothing when rebuilt.
    Allowed, with these alone, to read a DeepSpeed checkpoint with ``weights_only=True`` (:func:`check_deepspeed_files`)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_files(tag_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` (one line, :func:`unsafe_message`) unless every ``*.pt`` of a DeepSpeed checkpoint
    (a tag folder) reads with ``torch.load(weights_only=True)``, :func:`deepspeed_globals` allowed (memory-mapped: the
    tensors' bytes are not read). DeepSpeed's own loaders read them with ``weights_only=False``
    (``TorchCheckpointEngine.load``, deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py, and
    deepspeed/utils/zero_to_fp32.py, 0.19.8: no option turns it off, and ``safe_globals`` applies only to
    ``weights_only=True``), so llmc reads the same files first: a file that pickles anything else is refused before
    DeepSpeed opens it."""
    allowed = deepspeed_globals()
    for f in sorted(Path(tag_dir).rglob("*.pt")):
        safe_load(f, legacy=allowed, mmap=True)


#: what a ``torch.distributed.checkpoint`` ``.metadata`` file may name: DCP's own metadata classes (dataclasses and an
#: enum of torch.distributed.checkpoint.metadata / .filesystem), torch's Size, dtypes, layouts (by name) and a path.
#: DCP reads the file with a plain ``pickle.load`` (``FileSystemReader.read_metadata``, torch/distributed/checkpoint/
#: filesystem.py), so llmc reads it first with only these allowed (Python's "Restricting Globals":
#: https://docs.python.org/3/library/pickle.html#restricting-globals)
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension", "ZStandard"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},  # (Python 3.13)
    "collections": {"OrderedDict"},
}


def check_dcp_metadata(dcp_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` (one line) unless ``dcp_dir/.metadata`` unpickles with only
    :data:`_DCP_METADATA_GLOBALS` (and torch dtypes / memory formats) named: read before any DCP call reads it with
    ``pickle.load``; nothing in a refused file runs."""
    import pickle

    f = Path(dcp_dir) / ".metadata"

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if name in _DCP_METADATA_GLOBALS.get(module, ()) or (
                    module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                                  torch.layout))):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name}")

    try:
        with open(f, "rb") as fh:
            _Restricted(fh).load()
    except FileNotFoundError:
        return  # (DCP's own error names it)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {f}: refusing to load it: it pickles {e}, which is not DCP metadata and "
                              f"could run code when read ({UNSAFE_HINT})") from None
    except (EOFError, AttributeError, ImportError, TypeError, ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"checkpoint {f}: unreadable DCP metadata ({type(e).__name__}); refusing to load it "
                              f"({UNSAFE_HINT})") from None


def weights_only_load_planner(dcp_dir: str | Path):
    """A ``DefaultLoadPlanner`` (torch.distributed.checkpoint.default_planner) whose ``load_bytes`` reads each
    non-tensor entry of a DCP checkpoint (an optimizer's ``param_groups`` values: lr, betas, eps, the parameter
    names ...) with ``torch.load(value, weights_only=True)`` -- tensors and plain values only, never code
    (https://pytorch.org/docs/stable/notes/serialization.html#weights-only) -- where torch's reads them with
    ``weights_only=False`` (``DefaultLoadPlanner.load_bytes``, torch 2.14). Everything else (the state-dict
    flattening, ``set_element`` into the caller's nested dict) is torch's own. An entry that needs any other global
    raises :class:`CheckpointError` (one line naming ``dcp_dir`` and the entry); :func:`dcp_load` turns DCP's
    per-rank ``CheckpointException`` back into it. Every ``dcp.load`` of llmc passes one as ``planner=``."""
    import pickle

    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # (what torch's load_bytes uses)

    class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL ([\w.]+)", str(e))  # (torch's "Unsupported global: GLOBAL posix.system")
                what = found[1] if found else "an object torch.load(weights_only=True) does not read"
                raise CheckpointError(f"checkpoint {dcp_dir}: refusing to load its entry {fqn}: it pickles {what}, "
                                      f"which could run code when read ({UNSAFE_HINT})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _WeightsOnlyLoadPlanner()


def dcp_load(state: dict, dcp_dir: str | Path, **kw) -> None:
    """``torch.distributed.checkpoint.load(state, ...)`` of ``dcp_dir`` with :func:`weights_only_load_planner`
    (``kw``: ``storage_reader`` / ``no_dist``, else ``checkpoint_id=dcp_dir``), after :func:`check_dcp_metadata`. A
    refused entry is the planner's one-line :class:`CheckpointError`, not DCP's per-rank traceback."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    check_dcp_metadata(dcp_dir)
    if "storage_reader" not in kw:
        kw["checkpoint_id"] = str(dcp_dir)
    try:
        dcp.load(state, planner=weights_only_load_planner(dcp_dir), **kw)
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise CheckpointError(str(exc)) from None
        raise


INIT_HINT = "written for another model: start this stage from a checkpoint of its model (or rerun that stage with it)"
RESUME_HINT = ("written for another model: run it with the spec that wrote it, or move the checkpoint folder aside "
               "to start over")


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the model tensors a ``step-N`` folder holds, read without loading any of them: the DCP
    metadata's ``state_dict_metadata`` (``FileSystemReader(...).read_metadata()``; the ``model`` entries, flattened
    to ``model.<fqn>`` by DCP's ``flatten_state_dict``), else ``model.pt`` memory-mapped (``torch.load(mmap=True)``).
    https://pytorch.org/docs/stable/distributed.checkpoint.html"""
    path = Path(path)
    if (path / "dcp" / ".metadata").exists():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        check_dcp_metadata(path / "dcp")
        md = FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
        return {k[len("model."):]: tuple(v.size) for k, v in md.items()
                if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    sd = safe_load(path / "model.pt", mmap=True)
    return {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}


def model_shapes(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of what a checkpoint of ``model`` holds (``get_model_state_dict``: the names DCP and the
    full layout use, DDP / compile prefixes removed; a DTensor's ``shape`` is the whole tensor's); without the frozen
    parameters when ``trainable_only``. Not collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    target = _unwrap(model) if _world() == 1 else model
    sd = get_model_state_dict(target, options=_sd_options(ignore_frozen_params=trainable_only))
    return {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}


def _shape(s: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def check_shapes(path: str | Path, want: dict[str, tuple[int, ...]], *, extra_ok: bool = False,
                 hint: str = RESUME_HINT, have: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise :class:`CheckpointError` (one line: the first mismatching tensor, both shapes, the checkpoint and
    ``hint``) unless the checkpoint at ``path`` holds every tensor of ``want`` (name -> shape) with that shape, and
    (unless ``extra_ok``) no other. Run before any loading, so a checkpoint of another model is one line, not torch's
    size-mismatch traceback from inside the load. ``have``: the checkpoint's shapes when the caller read them
    (another format, e.g. DeepSpeed's); default :func:`checkpoint_shapes`."""
    have = checkpoint_shapes(path) if have is None else have
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"checkpoint {path}: has no tensor {name} (shape {_shape(shape)} in this model); "
                                  f"{hint}")
        if tuple(have[name]) != tuple(shape):
            raise CheckpointError(f"checkpoint {path}: tensor {name} has shape {_shape(have[name])}, this model's is "
                                  f"{_shape(shape)}; {hint}")
    if not extra_ok:
        for name in have:
            if name not in want:
                raise CheckpointError(f"checkpoint {path}: holds tensor {name} (shape {_shape(have[name])}) that this "
                                      f"model does not have; {hint}")


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP/TP: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if _world() == 1:
        return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=_sd_options(full_state_dict=True, cpu_offload=True))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


# ----------------------------------------------------------------------------- listing and verifying


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders (``step-N``; ``.tmp`` ignored), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    from llmc.runtime.job import STEP_DIR  # (the one step-folder name, matched whole)

    out = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return sorted(out)


def verify_checkpoint(path: str | Path) -> dict:
    """Return the manifest if every listed file exists with the recorded size and sha256; else raise."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise CheckpointError(f"checkpoint {path}: manifest.json missing (partial or foreign checkpoint); refusing to load")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {mf}: unreadable manifest ({type(e).__name__}: {e}); refusing to load") from None
    if manifest.get("format") != FORMAT or manifest.get("layout", "full") not in ("full", "dcp"):
        raise CheckpointError(f"checkpoint {mf}: format {manifest.get('format')!r}, expected {FORMAT}")
    for name, info in sorted(files.items()):
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {f}: file missing (partial checkpoint); refusing to load")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {f}: {size} bytes, manifest says {info['bytes']} "
                                  f"(truncated or partial); refusing to load")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {f}: sha256 mismatch with manifest (corrupt); refusing to load")
    return manifest


def latest_checkpoint(folder: str | Path, fallback: bool = False, log=print) -> Path | None:
    """The newest checkpoint that verifies. Default: the newest must verify or CheckpointError is raised
    (with a hint to delete it or use fallback); ``fallback=True`` skips bad ones, newest first, and
    rank 0 renames each skipped one to ``step-N.corrupt`` (kept for inspection, never picked again)."""
    ckpts = list_checkpoints(folder)
    for tmp in sorted(Path(folder).glob("step-*.tmp")) if Path(folder).is_dir() else []:
        log(f"note: ignoring unfinished checkpoint {tmp} (interrupted save)")
    for i, (_, path) in enumerate(reversed(ckpts)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            if not fallback:
                older = "; an older complete one may exist: move this one aside (or `llmc launch --fallback-checkpoint`)" if i + 1 < len(ckpts) else ""
                raise CheckpointError(f"{e}{older}") from None
            log(f"warning: skipping bad checkpoint: {e}")
            if _rank() == 0 and path.exists():
                aside = path.with_name(path.name + ".corrupt")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
    return None


# ----------------------------------------------------------------------------- save and load


_PENDING: dict = {}  # the async save in flight: future, tmp, final, folder, step, keep_latest
_ASYNC_GROUP = None


def _finalize(folder: Path, tmp: Path, final: Path, step: int, keep_latest: int | None, layout: str,
              asynchronous: bool = False) -> None:
    """Collective: hashes (each rank its own files), manifest, rename, prune."""
    rank, world = _rank(), _world()
    _barrier()
    mine = [p for p in sorted(tmp.rglob("*")) if p.is_file() and (
        p.name == f"rank-{rank}.pt" or (p.parent.name == "dcp" and p.name.startswith(f"__{rank}_")))]
    hashes = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in mine}
    if world > 1:
        every: list = [None] * world
        dist.all_gather_object(every, hashes)
        for h in every:
            hashes.update(h)
    if rank == 0:
        files = dict(hashes)
        for p in sorted(tmp.rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_file() and rel not in files:  # rank 0 writes these: train.json, model.pt, dcp/.metadata
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for d in [p for p in tmp.rglob("*") if p.is_dir()]:
            _fsync_dir(d)
        _publish(tmp, final, folder, {"format": FORMAT, "layout": layout, "async": asynchronous, "step": step,
                                      "world": world, "files": files}, keep_latest)
    _barrier()


def wait_for_checkpoint() -> Path | None:
    """Collective: finish the asynchronous save in flight (if any); returns its ``step-N`` path."""
    if not _PENDING:
        return None
    p = dict(_PENDING)
    _PENDING.clear()
    p["future"].result()  # this rank's shards are on disk
    _finalize(p["folder"], p["tmp"], p["final"], p["step"], p["keep_latest"], "dcp", asynchronous=True)
    return p["final"]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group is up; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _async_group():
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and _world() > 1:
        _ASYNC_GROUP = dist.new_group(backend="gloo")  # checkpoint collectives off the training group
    return _ASYNC_GROUP


def _save_dcp(folder: Path, tmp: Path, final: Path, step: int, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer | None, keep_latest: int | None, async_save: bool,
              model_sd: dict | None = None, trainable_only: bool = False) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = _unwrap(model) if _world() == 1 else model
    if model_sd is not None:  # the state to write, already made (e.g. LoRA merged into sharded weights)
        state = {"model": model_sd}
    elif optimizer is not None:
        msd, osd = get_state_dict(target, optimizer, options=_sd_options(ignore_frozen_params=trainable_only))
        state = {"model": msd, "optim": osd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(target)}
    if async_save:
        fut = dcp.async_save(state, checkpoint_id=str(tmp / "dcp"), process_group=_async_group())
        _PENDING.update(future=fut, folder=folder, tmp=tmp, final=final, step=step, keep_latest=keep_latest)
        return final
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    _finalize(folder, tmp, final, step, keep_latest, "dcp")
    return final


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    train_state: dict, keep_latest: int | None = None,
                    model_sd: dict[str, torch.Tensor] | None = None, *, sharded: bool = False,
                    async_save: bool = False, rank_state: dict | None = None, trainable_only: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final ``step-N`` path (complete on return unless
    ``async_save``: then after the next save or :func:`wait_for_checkpoint`).

    ``sharded``: DCP shards written by every rank (see the module docstring); else full files on rank 0.
    ``model_sd`` (full layout): the full state dict already gathered (rank 0; any value elsewhere), e.g.
    DeepSpeed ZeRO-3's layer-by-layer ``_zero3_consolidated_16bit_state_dict``; default: gathered here.
    ``model_sd`` (sharded layout, no optimizer): this rank's (DTensor) state dict to write instead of the
    model's.
    ``rank_state``: this rank's own resume state (e.g. a sampler's generator), kept in its ``rank-R.pt`` and
    given back by :func:`load_checkpoint` as ``"rank_state"``. ``trainable_only``: leave the frozen parameters
    out of the model state (a LoRA run's base weights; they are rebuilt from where the run started) --
    load it back with ``load_checkpoint(..., trainable_only=True)``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    wait_for_checkpoint()
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    tmp = folder / f"step-{step:08d}.tmp"
    rank, world = _rank(), _world()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if sharded:
        _save(_rank_payload(rank_state), tmp / f"rank-{rank}.pt")
        if rank == 0:
            _write_json({**train_state, "step": step}, tmp / "train.json")
        return _save_dcp(folder, tmp, final, step, model, optimizer, keep_latest, async_save,
                         model_sd if optimizer is None else None, trainable_only)
    if model_sd is None:
        model_sd = full_model_state(model)  # collectives: all ranks
    if trainable_only:
        frozen = _frozen_names(model)
        model_sd = {k: v for k, v in model_sd.items() if k not in frozen}
    optim_sd = None
    if optimizer is not None:
        if world == 1:
            optim_sd = get_optimizer_state_dict(_unwrap(model), optimizer, options=_sd_options(full_state_dict=True))
        else:
            optim_sd = get_optimizer_state_dict(model, optimizer, options=_sd_options(full_state_dict=True,
                                                                                          cpu_offload=True))
    _save(_rank_payload(rank_state), tmp / f"rank-{rank}.pt")
    if rank == 0:
        _save(model_sd, tmp / "model.pt")
        if optim_sd is not None:
            _save(optim_sd, tmp / "optimizer.pt")
        _write_json({**train_state, "step": step}, tmp / "train.json")
    _barrier()
    if rank == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        _publish(tmp, final, folder, {"format": FORMAT, "step": step, "world": world, "files": files}, keep_latest)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, trainable_only: bool = False) -> dict:
    """Verify, then load model (+ optimizer, + this rank's RNG) in place; returns train.json's dict, with
    this rank's ``rank_state`` (see :func:`save_checkpoint`) under ``"rank_state"`` when one was saved.

    Collective under FSDP/TP (every rank calls it). Works across layouts because the files are full.
    ``trainable_only``: the checkpoint holds only the trainable parameters; the frozen ones stay as they are.
    """

    path = Path(path)
    manifest = verify_checkpoint(path)
    check_shapes(path, model_shapes(model, trainable_only))
    if manifest.get("layout") == "dcp":
        _load_dcp(path, model, optimizer, trainable_only)
    else:
        _load_full(path, model, optimizer, trainable_only)
    rank_data: dict = {}
    if restore_rng:
        rank_file = path / f"rank-{_rank()}.pt"
        if not rank_file.exists():  # world size changed: reuse rank 0's generator state
            rank_file = path / "rank-0.pt"
        rank_data = safe_load(rank_file, legacy=_legacy_rank_globals())
        set_rng_state(rank_data)
    state = json.loads((path / "train.json").read_text())
    if "extra" in rank_data:
        state["rank_state"] = rank_data["extra"]
    state.setdefault("step", manifest["step"])
    return state


def _load_dcp(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              trainable_only: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    target = _unwrap(model) if _world() == 1 else model
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(target)}
        dcp_load(state, path / "dcp")
        set_model_state_dict(target, state["model"])
        return
    msd, osd = get_state_dict(target, optimizer, options=_sd_options(ignore_frozen_params=trainable_only))
    state = {"model": msd, "optim": osd}
    with _quiet_single_process():
        dcp_load(state, path / "dcp")  # in place, each rank reading the shards it needs
    set_state_dict(target, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_sd_options(strict=not trainable_only))


def _load_full(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               trainable_only: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_sd = safe_load(path / "model.pt")
    if trainable_only:
        frozen = _frozen_names(model)
        lacking = [n for n, _ in _unwrap(model).named_parameters() if n not in frozen and n not in model_sd]
        if lacking:
            raise CheckpointError(f"checkpoint {path}: lacks {len(lacking)} trainable tensors: {lacking[:3]}")
    if _world() == 1:
        _unwrap(model).load_state_dict(model_sd, strict=not trainable_only)
    else:
        set_model_state_dict(model, model_sd, options=_sd_options(full_state_dict=True, strict=not trainable_only))
    if optimizer is not None:
        if not (path / "optimizer.pt").exists():
            raise CheckpointError(f"checkpoint {path}: no optimizer.pt (model-only checkpoint); cannot resume training")
        optim_sd = safe_load(path / "optimizer.pt")
        target = _unwrap(model) if _world() == 1 else model
        set_optimizer_state_dict(target, optimizer, optim_sd, options=_sd_options(full_state_dict=True))


def _plain_name(key: str) -> str:
    """A LoRA-wrapped model's key under the plain model's name (``wq.base.weight`` -> ``wq.weight``)."""
    return key.replace(".base.", ".")


def load_model_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> int:
    """Load only the weights of a checkpoint folder (``step-N`` or a stage dir with DONE.json / checkpoints).

    For ``init_from`` and for post-training / DeepSpeed code; returns the checkpoint's step. A model whose
    linears already carry LoRA adapters (built on meta and sharded) gets its base weights (the adapters are
    not in the checkpoint and are left as they are).
    """
    path = resolve_checkpoint(path)
    manifest = verify_checkpoint(path)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    lora = any("lora_" in k for k in _unwrap(model).state_dict())
    want = {_plain_name(k) if lora else k: v for k, v in model_shapes(model).items() if "lora_" not in k}
    check_shapes(path, want, extra_ok=not strict or lora, hint=INIT_HINT)
    if manifest.get("layout") == "dcp" and _world() > 1:  # each rank reads the shards its layout needs
        mine = {k: v for k, v in get_model_state_dict(model).items() if "lora_" not in k}
        state = {"model": {_plain_name(k): v for k, v in mine.items()}}
        dcp_load(state, path / "dcp")
        loaded = {k: state["model"][_plain_name(k)] for k in mine}
        set_model_state_dict(model, loaded, options=_sd_options(strict=strict and not lora))
        return int(manifest["step"])
    sd = read_model_state(path)
    if lora:
        names = [k for k in _unwrap(model).state_dict() if "lora_" not in k]
        missing = [k for k in names if _plain_name(k) not in sd]
        if strict and missing:
            raise CheckpointError(f"checkpoint {path}: lacks {len(missing)} of the model's tensors: {missing[:3]}")
        sd = {k: sd[_plain_name(k)] for k in names if _plain_name(k) in sd}
    if _world() == 1:
        _unwrap(model).load_state_dict(sd, strict=strict and not lora)
    else:
        set_model_state_dict(model, sd, options=_sd_options(full_state_dict=True, strict=strict and not lora))
    return int(manifest["step"])


def resolve_checkpoint(path: str | Path) -> Path:
    """``step-N`` folder as is; a stage output dir -> DONE.json's checkpoint, else its newest checkpoint."""
    p = Path(path)
    if (p / "manifest.json").exists():
        return p
    done = p / "DONE.json"
    if done.exists():
        ck = json.loads(done.read_text()).get("checkpoint")
        if ck:
            return Path(ck) if Path(ck).is_absolute() else p / ck
    for sub in (p / "checkpoints", p):
        found = latest_checkpoint(sub) if sub.is_dir() else None
        if found:
            return found
    raise CheckpointError(f"{p}: no checkpoint found (expected step-N/manifest.json, DONE.json or checkpoints/)")
