"""Former name of :mod:`llmc.spec.schema` (kept so existing imports resolve)."""

from llmc.spec.schema import *  # noqa: F403
from llmc.spec.schema import __all__  # noqa: F401
