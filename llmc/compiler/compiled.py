"""Former name of :mod:`llmc.compiler.result` (kept so existing imports resolve)."""

from llmc.compiler.result import *  # noqa: F403
from llmc.compiler.result import __all__  # noqa: F401
