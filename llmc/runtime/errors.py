"""The runtime's one-line error types, in a module that imports nothing heavy: the commands that make no tensors
(``python -m llmc.runtime.entry prepare`` / ``check``, run before every stage a launch starts) name them in their
error handling without importing torch (seconds of CPU per process). :mod:`llmc.runtime.checkpoint` and
:mod:`llmc.runtime.train` re-export them where they were defined before."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (corrupt, partial, incompatible). ``str(e)`` is one line."""


class TrainingError(RuntimeError):
    """Training cannot continue (loss spikes beyond max_rewinds, bad layout, ...); one-line message."""


class NonFiniteStep(TrainingError):
    """A step whose loss or gradient norm is not finite on some rank, or weights that are not before a save:
    training stops there (error[R014]). ``str(e)`` is the line after ``error[R014] <stage>:``."""


class HFError(ValueError):
    """A Hugging Face checkpoint that cannot be loaded / written; ``str(e)`` is one line."""
