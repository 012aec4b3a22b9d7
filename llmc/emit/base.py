"""The emitter interface: one class per build target.

An emitter turns a compiled run into files. It reads only the ``Compiled`` object (and, for the
emitters that describe the whole build, the files the emitters before it in the registry wrote);
it never plans anything and never writes to disk (``llmc.cli`` does). Adding a target (a training
framework, a serving engine) is one module defining an ``Emitter`` subclass, its templates under
``llmc/templates/<target>/``, its tests, and one line in ``llmc.emit.EMITTERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from llmc.diagnostics import Diagnostic


class Emitter(ABC):
    """A build target. ``name`` is unique in the registry."""

    name: str = ""

    def applies(self, compiled) -> bool:
        """Whether this target emits anything for the run (default: always)."""
        return True

    def diagnostics(self, compiled) -> list[Diagnostic]:
        """Build diagnostics of this target (errors stop the build before anything is written;
        warnings are printed and listed in README.md). Paths are spec paths; ``file`` may be empty."""
        return []

    @abstractmethod
    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        """``{path relative to the build directory: text}``. ``earlier`` holds the files of the
        emitters before this one in the registry (read-only)."""
