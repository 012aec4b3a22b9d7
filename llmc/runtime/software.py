"""The software a run ran with, and how it compares with what the build was made for. Torch-free: the versions come
from the installed distributions' metadata (``importlib.metadata``), so ``llmc launch`` reads them without importing
torch.

:func:`runtime_versions` is what every trainer records in its ``start`` event (``metrics.jsonl``; the native and
DeepSpeed trainers and the post-training stages through ``llmc.runtime.observe.open_stage_log``, the torchtitan job an
inlined copy) and what a finished stage's ``DONE.json`` records under :data:`SOFTWARE_KEY`
(``llmc.runtime.job.fingerprint_record``): not part of the stage's fingerprint, so another version does not make a
finished stage stale. Python's version matters to the data too: the builtin ``python-docs`` corpus is the installed
standard library's docstrings (``llmc.runtime.corpus``).

:func:`target_mismatch` compares the installed versions with the lock's ``_llmc.target_versions`` (the versions the
build's artifacts were written for, ``llmc.TARGET_VERSIONS``): ``llmc launch`` says so once (L017).
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

#: the distributions a run records besides Python and llmc, in this order (one not installed is left out: deepspeed,
#: torchtitan and lm_eval are optional)
RECORDED = ("torch", "tokenizers", "transformers", "datasets", "deepspeed", "torchtitan", "lm_eval")
#: DONE.json's key for :func:`runtime_versions` (and the ``start`` events')
SOFTWARE_KEY = "software"
#: the backends whose own library a launch compares with the lock's target, besides torch (which every trainer runs)
BACKEND_DISTS = {"deepspeed": "deepspeed", "torchtitan": "torchtitan"}


def metadata_version(dist: str) -> str | None:
    """The version the installed distribution ``dist``'s metadata names (nothing imported); None when not installed."""
    try:
        return importlib.metadata.version(dist) or None
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return None


def installed_version(dist: str) -> str | None:
    """The version of ``dist``: the ``__version__`` of its module when this process has imported it (what runs: a
    wheel's metadata may leave out the local label its ``__version__`` has, ``2.14.1`` for ``2.14.1+cu130``), else
    its installed metadata (nothing imported); None when neither says."""
    v = getattr(sys.modules[dist], "__version__", None) if dist in sys.modules else None
    v = v or metadata_version(dist)
    return str(v) if v else None


def runtime_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.14.1+cu130", "tokenizers": ..., ..., "llmc": "0.1.0"}``: Python's version
    (``platform.python_version()``), each of :data:`RECORDED` that is installed (:func:`installed_version`: in a
    trainer, which has imported torch, its ``__version__``, a local label such as ``+cu130`` kept) and llmc's."""
    import llmc

    out = {"python": platform.python_version()}
    for dist in RECORDED:
        v = installed_version(dist)
        if v:
            out[dist] = v
    out["llmc"] = llmc.__version__
    return out


def public_version(version: str) -> str:
    """``version`` without its local label (PEP 440: ``2.14.1+cu130`` -> ``2.14.1``): the build the wheel was made for
    (CUDA, CPU) is not the release."""
    return version.split("+", 1)[0].strip()


def target_mismatch(targets: dict | None, backend: str | None) -> list[tuple[str, str, str]]:
    """``[(dist, built_for, installed)]`` for torch and, when ``backend`` is ``deepspeed`` / ``torchtitan``, that
    library, whose installed release (:func:`metadata_version`, without its local label: :func:`public_version`) is
    not the lock's target (``targets``: its ``_llmc.target_versions``); a library not installed, or without a target,
    is not compared."""
    if not isinstance(targets, dict):
        return []
    out = []
    for dist in ("torch", *([BACKEND_DISTS[backend]] if backend in BACKEND_DISTS else [])):
        want, have = targets.get(dist), metadata_version(dist)
        if isinstance(want, str) and want and have and public_version(have) != public_version(want):
            out.append((dist, want, public_version(have)))
    return out
