"""llmc: a declarative config compiler for LLM training runs.

Layout: ``llmc.spec`` (what is asked: pydantic models, YAML loading, presets),
``llmc.compiler`` (how much and how: pure functions, never imports torch),
``llmc.templates`` (Jinja2 templates), ``llmc.runtime`` (the model and trainer; the only
part that imports torch) and ``llmc.cli`` (the thin typer front end).
"""

__version__ = "0.1.0"

# Versions of the libraries the emitted artifacts target (recorded in every header and lockfile).
TARGET_VERSIONS = {
    "torch": "2.14.1",
    "torchtitan": "0.3.0",
    "deepspeed": "0.19.8",
    "vllm": "0.11",
    "sglang": "0.5",
}
