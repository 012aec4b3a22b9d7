"""The weight initialisation of a model trained from scratch: its one definition (no torch), for every backend.

The compiler resolves a model's :class:`InitScheme` (:func:`init_scheme`) and records it in the lock
(``model.init``); llmc's runtime (native, DeepSpeed: ``llmc.runtime.model.Transformer.init_weights``) reads it from
the lock (``llmc.runtime.job.TrainJob.init``) and the torchtitan emitter writes it into the job's ``param_init``
configs, so every backend starts a run from the same distributions. (A shared module, as :mod:`llmc.rope`: the runtime
imports no ``llmc.compiler``.)

Which weight takes which std (torchtitan's depth init, models/llama3/__init__.py and models/deepseek_v3/__init__.py
of torchtitan 0.3.0, ``_LINEAR_INIT`` / ``_depth_init`` / ``_output_linear_init``):

* ``std``: every projection that reads the residual stream: attention wq / wk / wv (MLA's wq, wq_a, wq_b, wkv_a,
  wkv_b), FFN w1, the MoE experts' w1, the shared experts' w1 and the router's gate;
* ``std / sqrt(2 (layer_id + 1))`` (``depth_scaling`` "layer"): the projections that write it: attention wo, FFN w2
  and w3, the experts' and shared experts' w2 and w3;
* ``embedding_std``: the token embeddings, and a tied output head (the same matrix);
* ``output_std``: an untied output head;
* every other parameter as its module resets it: norm gains 1 (Gemma's unit-offset norms 0), biases 0, attention
  sinks 0, the MoE expert bias 0.

Every truncated normal is cut at +-``truncation`` of its own std (torch's ``trunc_normal_`` with
``a = -t std, b = t std``); the embeddings are a plain normal (``embedding_truncation`` None).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmc.spec.model import Architecture

# std of the hidden projections: GPT-2's 0.02 (openai/gpt-2 src/model.py, ``tf.random_normal_initializer(
# stddev=0.02)``), Hugging Face's ``PretrainedConfig.initializer_range`` default (0.02: LlamaConfig, Qwen2Config, ...)
# and torchtitan's ``_LINEAR_INIT`` (``trunc_normal_(std=0.02)``, models/llama3/__init__.py)
BASE_STD = 0.02
# token embeddings N(0, 0.02), not truncated: GPT-2's wte (stddev 0.02) and Hugging Face's ``_init_weights`` for an
# nn.Embedding (``normal_(std=initializer_range)``). torchtitan 0.3.0's own default is N(0, 1) (``_EMBEDDING_INIT``);
# llmc keeps 0.02 so that a tied head starts with small logits and the runs of every backend agree.
EMBEDDING_STD = 0.02
# +-3 std: torchtitan's ``cutoff_factor = 3`` of its output head (models/llama3/__init__.py ``_output_linear_init``:
# ``trunc_normal_(std=s, a=-3 * s, b=3 * s)``), applied by llmc to every truncated normal (torchtitan's other linears
# take torch's default absolute bounds a=-2, b=2, which at std 0.02 cut nothing)
TRUNCATION_SIGMAS = 3.0
# the residual-output projections' std / sqrt(2 (layer_id + 1)): torchtitan's ``depth_init`` (models/common/
# param_init.py ``depth_scaled_std``), after GPT-2's scaling of the residual layers by 1 / sqrt(N) (Radford et al.
# 2019, sec. 2.3)
DEPTH_SCALING = "layer"
DEPTH_SCALINGS = (DEPTH_SCALING,)


@dataclass(frozen=True)
class InitScheme:
    """One model's initialisation (the module docstring says which weight takes which std)."""

    std: float = BASE_STD
    embedding_std: float = EMBEDDING_STD
    # the untied output head's std: d_model^-0.5 (torchtitan's ``final_out_std = dim**-0.5``,
    # models/llama3/__init__.py ``_output_linear_init``); None when the head is tied (it is the embeddings)
    output_std: float | None = None
    truncation: float = TRUNCATION_SIGMAS  # every truncated normal cut at +-truncation x its std
    embedding_truncation: float | None = None  # None: the embeddings are a plain normal
    depth_scaling: str = DEPTH_SCALING  # "layer": std / sqrt(2 (layer_id + 1)) (torchtitan's depth init)

    def out_std(self, layer_id: int) -> float:
        """The std of block ``layer_id``'s residual-output projections (wo, w2, w3)."""
        return self.std / math.sqrt(2 * (layer_id + 1))

    @property
    def head_std(self) -> float:
        """The output head's std: ``output_std``, or the embeddings' when the head is tied."""
        return self.embedding_std if self.output_std is None else self.output_std

    @property
    def head_truncation(self) -> float | None:
        """The output head's truncation in sigmas: ``truncation``, or the embeddings' when the head is tied."""
        return self.embedding_truncation if self.output_std is None else self.truncation

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str = "model.init") -> InitScheme:
        """The scheme of a lock's ``model.init``; ValueError with a one-line reason naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"lock: {where} must be an object (rebuild with `llmc build`)")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"lock: {where}.{unknown[0]} is not a field of the initialisation (rebuild with "
                             "`llmc build`)")
        for key in ("std", "embedding_std", "truncation", "output_std", "embedding_truncation"):
            v = d.get(key)
            optional = key in ("output_std", "embedding_truncation")
            if (v is None and not optional) or (v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                                                   or not math.isfinite(v) or v <= 0)):
                raise ValueError(f"lock: {where}.{key} must be a positive number{' or null' if optional else ''}, "
                                 f"got {v!r} (rebuild with `llmc build`)")
        if d.get("depth_scaling") not in DEPTH_SCALINGS:
            raise ValueError(f"lock: {where}.depth_scaling must be one of {', '.join(DEPTH_SCALINGS)}, got "
                             f"{d.get('depth_scaling')!r} (rebuild with `llmc build`)")
        return cls(**{k: float(v) if isinstance(v, int) else v for k, v in d.items()})


def init_scheme(arch: Architecture) -> InitScheme:
    """The initialisation of ``arch`` trained from scratch: :class:`InitScheme`'s defaults, with an untied output
    head at d_model^-0.5 (torchtitan's ``final_out_std``)."""
    return InitScheme(output_std=None if arch.tied_embeddings else float(arch.d_model) ** -0.5)
