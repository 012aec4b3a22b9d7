"""llmc: a declarative config compiler for LLM training runs.

Layers, each depending only on the ones before it:
``llmc.spec`` (what is asked: pydantic models, YAML loading, presets) ->
``llmc.compiler`` (how much and how: pure functions, never imports torch, reads no files) ->
``llmc.emit`` (one emitter per build target, with ``llmc.templates``) ->
``llmc.cli`` (the thin typer front end, the only code that writes files), with ``llmc.report``
(the plan report) and ``llmc.launch`` (the commands that run a build) beside it.
``llmc.runtime`` (the model and trainers; the only part that imports torch) reads only the lock.
"""

__version__ = "0.1.0"

# Versions of the libraries the emitted artifacts target (recorded in every header and lockfile).
TARGET_VERSIONS = {
    "torch": "2.14.1",
    "torchtitan": "0.3.0",
    "deepspeed": "0.19.8",
    "vllm": "0.33.0",
    "sglang": "0.5",
}
