"""What each training backend llmc launches can run (no torch import: the emitters read it too).

The native runtime (``llmc.runtime.train``) shards with DDP, FSDP2, HSDP and tensor parallelism; it has
no pipeline, context or expert parallelism, so a plan using any of those runs on torchtitan. llmc's
DeepSpeed runner (``llmc.runtime.ds_train``) and the torchtitan job train the next-token LM stages;
chat post-training stages (SFT, DPO, GRPO) run on the native runtime.
"""

from __future__ import annotations

from llmc.spec.schema import LM_KINDS

#: Parallel degrees the native trainer refuses (a plan using any of them runs on torchtitan).
NATIVE_UNSUPPORTED: tuple[str, ...] = ("pp", "cp", "ep")
#: Stage kinds llmc's DeepSpeed runner trains; the others run on the native runtime.
DS_STAGE_KINDS: tuple[str, ...] = LM_KINDS
#: Stage kinds the emitted torchtitan job runs; the others run on the native runtime.
TITAN_STAGE_KINDS: tuple[str, ...] = ("pretrain",)
