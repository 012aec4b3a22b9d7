"""Lines other libraries print to the console that read like errors but are none, silenced narrowly: each one by who
prints it (a logger's name, a subprocess), its exact message and where it comes from, so that every other warning,
those of the same logger included, still shows. Torch-free (``logging`` / ``subprocess`` only).

* :func:`quiet_torchao_enum_notice`: torch's notice, once per torchao enum, that registering an Enum as a pytree
  constant is deprecated (two ``W... torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass ...``
  lines whenever torchao is imported: by transformers' model loading in the eval step, by torchtitan).
* :func:`quiet_git_describe`: ``fatal: not a git repository ...`` from the ``git describe`` lm-evaluation-harness
  runs to record a git hash in its results, when the eval step's directory is not in a git checkout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator

#: torch's logger of the notice (torch/utils/_pytree.py: ``log = logging.getLogger(__name__)``)
PYTREE_LOGGER = "torch.utils._pytree"
#: the notice's format string, torch 2.14 ``torch.utils._pytree._private_register_pytree_node``
_ENUM_NOTICE = re.compile(r"%s is an Enum subclass and is now natively supported by torch\.compile as an opaque "
                          r"value type\. Calling register_constant\(\) on Enum subclasses is deprecated")


class TorchaoEnumNotice(logging.Filter):
    """Drops torch's Enum ``register_constant`` deprecation notice for an enum of torchao, nothing else.

    torchao 0.18 registers its enums as pytree constants at import (``torchao.utils.register_as_pytree_constant`` on
    ``torchao.quantization.quantize_.common.kernel_preference.KernelPreference`` and
    ``torchao.prototype.mx_formats.config.ScaleCalculationMode``); torch 2.14 logs a WARNING for each
    (``torch.utils._pytree._private_register_pytree_node``: Enums are now opaque value types). It is a log record,
    not a Python warning (``warnings.filterwarnings`` does not see it), about torchao's code, not llmc's (llmc imports
    no torchao name: transformers' ``quantizers.quantizer_torchao`` and torchtitan's float8 converters do), and
    nothing a user can act on. The same notice for any other library's enum, and every other record of the logger,
    pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str) or not _ENUM_NOTICE.match(record.msg):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        module = getattr(args[0], "__module__", "") if args else ""
        return not (isinstance(module, str) and (module == "torchao" or module.startswith("torchao.")))


def quiet_torchao_enum_notice() -> None:
    """Install :class:`TorchaoEnumNotice` on torch's pytree logger (idempotent). Must run before torchao is first
    imported (the notice is logged once, at that import)."""
    log = logging.getLogger(PYTREE_LOGGER)
    if not any(isinstance(f, TorchaoEnumNotice) for f in log.filters):
        log.addFilter(TorchaoEnumNotice())


def git_commit_hash() -> str | None:
    """lm-evaluation-harness 0.4.13's ``lm_eval.loggers.utils.get_git_commit_hash`` with git's stderr discarded.

    lm_eval's ``simple_evaluate`` (lm_eval/evaluator.py) records ``results["git_hash"] = get_git_commit_hash()``,
    which runs ``git describe --always`` in the working directory with stderr left on the console: outside a git
    checkout (the usual build directory) git prints ``fatal: not a git repository (or any of the parent
    directories): .git``, lm_eval catches the CalledProcessError and falls back to ``get_commit_from_path(cwd)``
    (reading ``.git/HEAD`` itself), which gives None there. This function does exactly that, with git's stderr
    discarded: the same value in every case (the describe string inside a checkout; lm_eval's fallback, None outside
    one), and no line. No environment variable silences git's ``fatal:`` (``GIT_DIR`` and
    ``GIT_CEILING_DIRECTORIES`` only change which checkout it looks for), hence a function in place of lm_eval's."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"],  # noqa: S607 - as lm_eval runs it
                                       stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):  # (FileNotFoundError: no git installed)
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git_describe() -> Iterator[None]:
    """While inside, lm_eval's ``simple_evaluate`` records its git hash through :func:`git_commit_hash` (the name
    ``lm_eval.evaluator`` imported from ``lm_eval.loggers.utils`` is swapped, and restored on exit)."""
    import lm_eval.evaluator as evaluator

    was = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = was
