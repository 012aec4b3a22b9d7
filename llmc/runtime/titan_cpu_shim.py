"""Run torchtitan 0.3.0 training on CPU with gloo -- for tests and `llmc launch` without a GPU ONLY.

Never referenced by the emitted GPU scripts. Usage (same arguments as ``torchtitan.train``)::

    PYTHONPATH=<build>/torchtitan torchrun --nproc_per_node=2 -m llmc.runtime.titan_cpu_shim \\
        --module llmc_job --config job [--training.steps 4 ...]

torchtitan picks ``torch._utils._get_available_device_type() or "cuda"`` at import time
(torchtitan/tools/utils.py) and then calls ``torch.cuda.*``; it has no CPU setting. This shim
patches torch (never torchtitan's files) before torchtitan is imported:

1. device type ``cpu`` (so the process group backend is gloo);
2. ``torch.cpu`` stubs for the memory-monitor calls (``get_device_name``, ``get_device_properties``,
   ``memory_stats``, ``reset_peak_memory_stats``, ``empty_cache``) and ``current_device() -> 0``
   (the real one returns ``"cpu"``, which ``dist.barrier(device_ids=[...])`` rejects);
3. FSDP2 on gloo: torchtitan calls ``set_gradient_divide_factor(1.0)``, which makes FSDP2
   reduce-scatter with ``PREMUL_SUM``; gloo rejects that op, so we also force SUM reductions
   (numerically identical for a factor of 1.0);
4. CPU-only model override, applied to the parsed ``Trainer.Config``: every ``FlexAttention``
   inner attention is replaced by torchtitan's mask-less ``ScaledDotProductAttention`` (plain
   causal attention: documents packed into one sequence are not isolated), because FlexAttention
   has no CPU backward ("FlexAttention does not support backward on CPU"). Set
   ``LLMC_TITAN_KEEP_FLEX=1`` to keep FlexAttention (e.g. forward-only dry runs).

5. expert parallelism on gloo: uneven ``all_to_all`` chunks go through ``all_to_all_single`` with
   split sizes (gloo's list form rejects uneven sizes).
6. a barrier before ``destroy_process_group``: torchtitan's ``main`` destroys the group only after
   training succeeded, and a gloo rank that tears its pairs down while a peer is still in a collective
   can abort that peer at exit ("terminate called without an active exception"); the ranks leave together.
7. torch's deprecation notice about torchao's enums, logged when torchtitan imports torchao, is dropped
   (:func:`llmc.runtime.quiet.quiet_torchao_enum_notice`; every other warning shows).
"""

from __future__ import annotations

import os
import sys
import types


def _patch_torch() -> None:
    import torch
    import torch._utils as tu

    tu._get_available_device_type = lambda: "cpu"

    cpu = torch.cpu
    # host RAM stands in for "device memory" (the monitor divides by it)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    stubs = {
        "get_device_name": lambda *a, **k: "cpu",
        "get_device_properties": lambda *a, **k: types.SimpleNamespace(total_memory=total, name="cpu"),
        "reset_peak_memory_stats": lambda *a, **k: None,
        "empty_cache": lambda *a, **k: None,
        "memory_stats": lambda *a, **k: {},
    }
    for name, fn in stubs.items():
        if not hasattr(cpu, name):
            setattr(cpu, name, fn)
    cpu.current_device = lambda: 0

    _patch_gloo_all_to_all()

    from torch.distributed.fsdp import FSDPModule

    orig = FSDPModule.set_gradient_divide_factor
    if getattr(orig, "_llmc_patched", False):
        return

    def set_gradient_divide_factor(self, factor: float) -> None:
        orig(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    set_gradient_divide_factor._llmc_patched = True  # type: ignore[attr-defined]
    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


def _patch_gloo_all_to_all() -> None:
    """Expert parallelism exchanges uneven token chunks with ``dist.all_to_all(list, list)``; gloo's
    list form requires equal sizes ("ProcessGroupGloo::alltoall: invalid tensor size"), but its
    ``all_to_all_single`` takes split sizes. Route uneven gloo calls through that (same result)."""
    import torch
    import torch.distributed as dist

    orig = dist.all_to_all
    if getattr(orig, "_llmc_patched", False):
        return

    def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
        uneven = len({t.shape for t in [*output_tensor_list, *input_tensor_list]}) > 1
        if async_op or not uneven or dist.get_backend(group) != "gloo":
            return orig(output_tensor_list, input_tensor_list, group=group, async_op=async_op)
        inp = torch.cat([t.reshape(-1) for t in input_tensor_list])
        out = inp.new_empty(sum(t.numel() for t in output_tensor_list))
        dist.all_to_all_single(out, inp, output_split_sizes=[t.numel() for t in output_tensor_list],
                               input_split_sizes=[t.numel() for t in input_tensor_list], group=group)
        for t, chunk in zip(output_tensor_list, out.split([t.numel() for t in output_tensor_list]), strict=True):
            t.copy_(chunk.view_as(t))
        return None

    all_to_all._llmc_patched = True  # type: ignore[attr-defined]
    dist.all_to_all = all_to_all


def swap_flex_for_sdpa(config) -> int:
    """Replace FlexAttention inner attention by ScaledDotProductAttention in a Trainer.Config's
    model; returns how many were swapped. CPU/test-only (see module docstring)."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    spec = getattr(config, "model_spec", None)
    if spec is None:
        return 0
    hits = list(spec.model.traverse(FlexAttention.Config))
    for _, _, parent, attr in hits:
        if isinstance(attr, int):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return len(hits)


def _patch_config_manager() -> None:
    from torchtitan.config.manager import ConfigManager

    orig = ConfigManager.parse_args
    if getattr(orig, "_llmc_patched", False):
        return

    def parse_args(self, args=None):
        config = orig(self, args)
        if os.environ.get("LLMC_TITAN_KEEP_FLEX") != "1":
            swap_flex_for_sdpa(config)
        return config

    parse_args._llmc_patched = True  # type: ignore[attr-defined]
    ConfigManager.parse_args = parse_args


def _patch_teardown() -> None:
    import torch.distributed as dist

    if getattr(dist.destroy_process_group, "_llmc_patched", False):
        return
    destroy = dist.destroy_process_group

    def destroy_together(*a, **k):
        if dist.is_initialized():
            dist.barrier()
        destroy(*a, **k)

    destroy_together._llmc_patched = True  # type: ignore[attr-defined]
    dist.destroy_process_group = destroy_together


def install() -> None:
    """Apply all CPU patches (idempotent). Must run before torchtitan is first imported."""
    if "torchtitan.tools.utils" in sys.modules:
        from torchtitan.tools import utils as tt_utils

        if tt_utils.device_type != "cpu":
            raise RuntimeError("titan_cpu_shim.install() must run before torchtitan is imported")
    _patch_torch()
    _patch_config_manager()
    _patch_teardown()


def main() -> None:
    install()
    from llmc.runtime.quiet import quiet_torchao_enum_notice

    quiet_torchao_enum_notice()  # (torchtitan imports torchao: torch's notice about torchao's enums)
    from torchtitan.train import main as titan_main

    titan_main()


if __name__ == "__main__":
    main()
