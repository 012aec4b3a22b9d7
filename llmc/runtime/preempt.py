"""Graceful preemption: a SIGTERM / SIGUSR1 makes the training loops save the current step and stop.

A cluster that takes a job's nodes back asks first, then kills: Slurm sends SIGTERM to every process of
the job (or of a step) and SIGKILL ``KillWait`` seconds later (30 s by default; slurm.conf(5)), and, with
``sbatch --signal=[B:]SIG@SECONDS``, a chosen signal that long before the time limit; Kubernetes sends
SIGTERM and SIGKILL after ``terminationGracePeriodSeconds`` (30 s by default; "Pod Lifecycle: Termination
of Pods", kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/). torchrun forwards a SIGTERM it
receives to its workers and kills them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds later (30 by default;
torch/distributed/launcher/api.py). Without a handler, everything since the last interval checkpoint is
lost. The same mechanism in other trainers:

* Megatron-LM ``--exit-signal-handler``: "Dynamically save the checkpoint and shutdown the training if
  SIGTERM is received" (megatron/training/arguments.py); megatron/training/dist_signal_handler.py sets a
  flag in the handler and all-gathers it so every rank sees the signal any rank received;
* NeMo's ``PreemptionCallback`` (nemo/utils/callbacks/preemption.py): checkpoint and exit at the end of
  the step in which SIGTERM arrived;
* PyTorch Lightning's SLURM plugin (lightning/pytorch/trainer/connectors/signal_connector.py): on SIGUSR1,
  save a checkpoint and ``scontrol requeue`` the job.

The handlers cannot tell who sent a SIGTERM: a preemption, a time limit, or a user's ``scancel`` (job state
CANCELLED; scancel(1)) all save the current step the same way, which is harmless. Whether the job then comes back
is the launcher's decision: the Slurm script requeues only on its time-limit signal (USR1), never on a SIGTERM
(``llmc/templates/slurm/slurm.sbatch.j2``).

Here: :func:`handlers` (a context manager; the trainers enter it around their loop) installs, in the main
thread of each worker process, handlers for SIGTERM and SIGUSR1 that only record the signal (no work inside
a handler: it may interrupt anything, an all-reduce or a checkpoint write included); the loops call
:func:`stop_now` at every step boundary: whether ANY rank got a signal, and whether any rank is past the run's
time limit (one all-reduce MAX of two elements), so every rank saves the same step and leaves together. A stage that stops
this way reports status ``"preempted"`` and ``python -m llmc.runtime.entry`` exits with
:data:`EXIT_PREEMPTED`; rerunning it resumes from the checkpoint of the step where it stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

from llmc.runtime.runlock import EXIT_PREEMPTED  # noqa: F401 -- defined where the torch-free launcher reads it

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []  # signals recorded by the handler (appending is all it does)
_depth = 0  # nesting of handlers(); the handlers are installed by the outermost one


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _max_across(flags: list[bool], device: torch.device | None) -> list[bool]:
    """Each flag OR-ed over the ranks: one all-reduce MAX of ``len(flags)`` elements when world > 1 (every
    rank must call it with as many flags). ``device``: where the collective runs (the CUDA device under
    NCCL; default: the current CUDA device under NCCL, else the CPU)."""
    if world() == 1:
        return list(flags)
    if device is None:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def any_across(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on any rank (an all-reduce MAX of one element when world > 1; every rank
    must call it)."""
    return _max_across([flag], device)[0]


def _record(signum: int, frame) -> None:  # the handler: record, nothing else
    _received.append(signum)


def installed() -> bool:
    return _depth > 0


def received() -> str | None:
    """The first signal this process received while the handlers were installed (its name), or None."""
    return signal.Signals(_received[0]).name if _received else None


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Install the SIGTERM / SIGUSR1 handlers for the duration (main thread only: Python runs signal
    handlers there and refuses ``signal.signal`` elsewhere; from another thread this does nothing and
    :func:`requested` stays False). The previous handlers are restored on exit; nested uses share the
    outermost installation. Every rank of a job runs the trainer on its main thread, so all ranks agree on
    whether the handlers are installed, which :func:`requested`'s collective relies on."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    if _depth == 0:
        _received.clear()
        previous = {s: signal.signal(s, _record) for s in SIGNALS}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, h in previous.items():
            signal.signal(s, h)


def requested(device: torch.device | None = None) -> bool:
    """Whether any rank received SIGTERM / SIGUSR1 since :func:`handlers` was entered (a collective when
    world > 1 and the handlers are installed; False without a collective when they are not)."""
    return stop_now(None, True, device)[1]


def stop_now(late: bool | None, check_signal: bool, device: torch.device | None = None) -> tuple[bool, bool]:
    """A training loop's end-of-step question, agreed by every rank in one collective: (``late`` on any
    rank, a SIGTERM / SIGUSR1 on any rank). ``late``: this rank's "over the time limit", None when the run has
    no time limit; ``check_signal``: False where a signal needs no answer (after the last step). One
    all-reduce MAX of two elements when world > 1 and there is something to agree on, none otherwise;
    every rank must pass the same ``late is None`` and ``check_signal``."""
    sig = check_signal and installed()
    if late is None and not sig:
        return False, False
    over, signalled = _max_across([bool(late), sig and bool(_received)], device)
    return over, signalled
