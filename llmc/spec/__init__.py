"""llmc.spec: what a run asks for.

Pydantic models (:mod:`llmc.spec.model`, :mod:`llmc.spec.schema`), the YAML loader with line
numbers and diagnostics (:mod:`llmc.spec.load`), model presets (:mod:`llmc.spec.presets`)
and the Hugging Face ``config.json`` importer (:mod:`llmc.spec.hf`). No math, no torch.
"""
