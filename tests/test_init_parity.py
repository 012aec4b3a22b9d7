"""One weight initialisation on every backend, fixed by the lock (``model.init``, llmc.weight_init).

The torchtitan job's freshly initialised model (built by torchtitan 0.3.0 from the emitted job, on the CPU) draws
every parameter from the distribution llmc's own runtime draws it from (native; DeepSpeed runs the same
``Transformer.init_parts``) under the lock's scheme: per parameter, the empirical std and max |x| / std agree within
sampling tolerance (dense untied and tied heads, q/k norms and q/k/v biases, an MoE with shared experts, MLA + MoE).
The scheme's numbers are checked against their public sources (torchtitan's own output-head init and depth rule,
Hugging Face's ``initializer_range``); an older lock without ``model.init`` runs with the scheme llmc's runtime drew
then, a malformed one is refused in one line naming the field.
"""

from __future__ import annotations

import math
import re

import pytest
import yaml

from llmc.weight_init import InitScheme, init_scheme

MODELS = {
    "dense_untied": {"name": "u", "n_layers": 3, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                     "vocab_size": 512, "max_seq_len": 128},
    "dense_tied": {"name": "t", "n_layers": 3, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                   "vocab_size": 512, "max_seq_len": 128, "tied_embeddings": True},
    "qk_norm_qkv_bias": {"name": "q", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                         "vocab_size": 512, "max_seq_len": 128, "qk_norm": True, "qkv_bias": True},
    "moe": {"name": "m", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "vocab_size": 512,
            "max_seq_len": 128, "qk_norm": True,
            "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "dense_layers": 1}},
    "mla_moe": {"name": "d", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "d_ff": 128,
                "vocab_size": 512, "max_seq_len": 128,
                "mla": {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                        "v_head_dim": 16},
                "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "dense_layers": 1,
                        "score_func": "sigmoid", "expert_bias": True, "aux_loss_coef": 0}},
}
SAMPLES = 2**15  # draws pooled per parameter (over re-initialisations with other seeds)


def _compiled(model: dict):
    """The real compiler's output for a tiny CPU spec (examples/tiny_cpu.yaml's shape) on torchtitan."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    spec = {"name": "init-parity", "model": model, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "python-docs", "format": "builtin"}],
                     "tokenizer": {"train": True, "vocab_size": model["vocab_size"]}, "seq_len": 128,
                     "tokens": 2.048e6},
            "training": {"backend": "torchtitan", "precision": "fp32", "global_batch_tokens": 4096}}
    run, lines = loads_spec(yaml.safe_dump(spec), file="init_parity.yaml")
    return compile_spec(run, spec_path="init_parity.yaml", yaml_lines=lines)


# ----------------------------------------------------------------------------------- the scheme and the lock


def test_the_scheme_is_its_sources_numbers():
    """std and embedding std: Hugging Face's initializer_range (GPT-2's 0.02); the untied head and the truncation:
    torchtitan's own output-head init (dim^-0.5 cut at +-3 std); the depth rule: torchtitan's depth_scaled_std."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchtitan")
    from torchtitan.models.common.param_init import depth_scaled_std
    from torchtitan.models.llama3 import _output_linear_init

    from llmc.spec.model import Architecture

    arch = Architecture(**MODELS["dense_untied"])
    s = init_scheme(arch)
    hf = transformers.LlamaConfig().initializer_range
    assert s.std == hf and s.embedding_std == hf and s.embedding_truncation is None
    head = _output_linear_init(arch.d_model)["weight"].keywords
    assert s.output_std == head["std"] and s.head_std == head["std"]
    assert -s.truncation * s.output_std == head["a"] and s.truncation * s.output_std == head["b"]
    assert [s.out_std(i) for i in range(4)] == [depth_scaled_std(s.std, i) for i in range(4)]
    tied = init_scheme(arch.model_copy(update={"tied_embeddings": True}))
    assert tied.output_std is None and tied.head_std == tied.embedding_std and tied.head_truncation is None


def test_the_lock_records_the_scheme_and_the_runtime_reads_it():
    from llmc.emit.lock import lock_dict
    from llmc.runtime.job import TrainJob, lock_init

    c = _compiled(MODELS["dense_untied"])
    lock = lock_dict(c)
    assert lock["model"]["init"] == c.model.init.to_json()
    assert lock_init(lock, c.spec.model) == c.model.init == init_scheme(c.spec.model)
    assert TrainJob.from_lock(lock).init == c.model.init
    edited = lock_dict(c)
    edited["model"]["init"]["embedding_std"] = 0.01  # the runtime draws what the lock says
    assert TrainJob.from_lock(edited).init.embedding_std == 0.01


def test_an_older_lock_without_the_scheme_takes_the_one_its_runtime_drew():
    """A lock written before llmc recorded the initialisation (as one written before training.optimizer.no_decay:
    tests/test_no_decay_rule.py) runs with the architecture's scheme, the numbers llmc's runtime drew then."""
    from llmc.emit.lock import lock_dict
    from llmc.runtime.job import TrainJob

    for case in ("dense_untied", "dense_tied"):
        c = _compiled(MODELS[case])
        lock = lock_dict(c)
        del lock["model"]["init"]
        assert TrainJob.from_lock(lock).init == c.model.init


@pytest.mark.parametrize("edit,msg", [
    ({"std": "0.02"}, "lock: model.init.std must be a positive number, got '0.02'"),
    ({"truncation": None}, "lock: model.init.truncation must be a positive number, got None"),
    ({"output_std": -1.0}, "lock: model.init.output_std must be a positive number or null, got -1.0"),
    ({"depth_scaling": "gpt2"}, "lock: model.init.depth_scaling must be one of layer, got 'gpt2'"),
    ({"mean": 0.0}, "lock: model.init.mean is not a field of the initialisation"),
])
def test_a_malformed_scheme_is_refused_naming_its_field(edit, msg):
    d = InitScheme(output_std=0.125).to_json() | edit
    with pytest.raises(ValueError) as e:
        InitScheme.from_json(d)
    assert str(e.value).startswith(msg) and "rebuild with `llmc build`" in str(e.value)


def test_read_lock_refuses_a_scheme_that_is_not_an_object(tmp_path):
    import json

    from llmc.emit.lock import lock_dict
    from llmc.lockfile import read_lock

    lock = lock_dict(_compiled(MODELS["dense_untied"]))
    lock["model"]["init"] = [0.02]
    p = tmp_path / "plan.lock.json"
    p.write_text(json.dumps(lock))
    with pytest.raises(ValueError, match=r"model\.init must be an object, got a list"):
        read_lock(p)


# ------------------------------------------------------------------ the torchtitan job's model against llmc's


def _native_names(titan: str) -> list[str]:
    """llmc's runtime parameters a torchtitan 0.3.0 parameter holds (llmc's names are torchtitan's, but for the
    fused q/k/v projection and the grouped experts' layout suffixes)."""
    m = re.fullmatch(r"(.*\.attention)\.qkv_linear\.wqkv\.(weight|bias)", titan)
    if m:
        return [f"{m[1]}.{w}.{m[2]}" for w in ("wq", "wk", "wv")]
    m = re.fullmatch(r"(.*\.moe)\.routed_experts\.inner_experts\.(w[123])_E[FD][DF]", titan)
    if m:
        return [f"{m[1]}.experts.{m[2]}"]
    return [titan]


def _draws(named: dict, init, reps: int) -> dict[str, object]:
    """name -> the parameter's values over ``reps`` initialisations (seeds 0..reps-1), flattened and concatenated."""
    import torch

    out: dict[str, list] = {n: [] for n in named}
    for r in range(reps):
        torch.manual_seed(r)
        with torch.no_grad():
            init()
        for n, p in named.items():
            out[n].append(p.detach().flatten().double().clone())
    return {n: torch.cat(v) for n, v in out.items()}


def _stats(x) -> tuple[float, float]:
    std = float(x.std())
    return std, float(x.abs().max()) / std


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MODELS))
def test_torchtitan_job_initialises_every_parameter_as_llmcs_runtime(case, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    from test_torchtitan import load_job, write_build

    from llmc.emit.lock import lock_dict
    from llmc.runtime.job import lock_init
    from llmc.runtime.model import build_model

    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                 "LLMC_RUN_DIR": str(tmp_path / "run")}.items():
        monkeypatch.setenv(k, v)
    c = _compiled(MODELS[case])
    arch = c.spec.model
    init = lock_init(lock_dict(c), arch)  # what llmc's runtime reads (TrainJob.init)
    native = build_model(arch, "cpu", seed=None, init=init)
    cfg = load_job(write_build(c, tmp_path / "build"), "job_without_converters")
    with torch.device("meta"):
        titan = cfg.model_spec.model.build()
    titan.to_empty(device="cpu")
    with torch.no_grad():
        titan.init_weights(buffer_device=None)  # (a tied head is tied again by torchtitan's init: Decoder.init_states)

    titan_params = dict(titan.named_parameters())
    native_params = dict(native.named_parameters())
    mapped = {t: _native_names(t) for t in titan_params}
    # every trainable parameter of llmc's model is one torchtitan initialises (the expert bias: a buffer there)
    assert sorted(n for ns in mapped.values() for n in ns) == sorted(
        n for n, p in native_params.items() if p.requires_grad), case
    if arch.tied_embeddings:
        assert "lm_head.weight" not in native_params and titan.lm_head.weight is titan.tok_embeddings.weight

    reps = max(1, math.ceil(SAMPLES / min(p.numel() for p in native_params.values() if p.dim() > 1)))
    got = _draws(titan_params, lambda: titan.init_weights(buffer_device=None), reps)
    want = _draws(native_params, lambda: native.init_weights(init), reps)
    for t, names in mapped.items():
        x = got[t]
        y = torch.cat([want[n].view(reps, -1) for n in names], dim=1).flatten()  # (the fused order per draw)
        assert x.numel() == y.numel(), t
        if float(y.std()) == 0.0:  # norm gains, biases: a constant
            assert float(x.std()) == 0.0 and torch.equal(x.unique(), y.unique()), (case, t)
            continue
        (sx, mx), (sy, my) = _stats(x), _stats(y)
        # the sample std of n normal draws has a relative sd of about 1 / sqrt(2n); 6 of them apart is a difference
        tol = 6 * math.sqrt(1 / (2 * x.numel()) + 1 / (2 * y.numel()))
        assert abs(sx / sy - 1) < tol, f"{case} {t}: std {sx:.5f} (torchtitan) vs {sy:.5f} (llmc's runtime)"
        # max |x| / std: a normal cut at +-3 std stays under 3 / 0.9866 = 3.04; 2**15 uncut draws reach past 3.2
        # (P(every |x| < 3.2 std) = 0.99863**32768 < 1e-19)
        assert (mx < 3.2) == (my < 3.2), f"{case} {t}: max|x|/std {mx:.3f} (torchtitan) vs {my:.3f} (llmc's runtime)"
        if my < 3.2:
            assert abs(mx - my) < 0.05, (case, t, mx, my)
    if arch.moe is not None and arch.moe.expert_bias:  # torchtitan's buffer and llmc's frozen parameter: zeros
        for i in range(arch.moe.dense_layers, arch.n_layers):
            assert not titan.layers[str(i)].moe.expert_bias_E.any()
            assert not native_params[f"layers.{i}.moe.expert_bias"].any()


def test_the_job_names_the_locks_numbers():
    """The emitted job's initialisation constants are the lock's (rendering only, no torch)."""
    from llmc.emit.torchtitan import render_torchtitan

    for case, tied in (("dense_untied", False), ("dense_tied", True)):
        c = _compiled(MODELS[case])
        src = render_torchtitan(c, strict=True)["torchtitan/llmc_job.py"]
        s = c.model.init
        assert f"INIT_STD = {s.std!r}\n" in src and f"INIT_TRUNCATION = {s.truncation!r}\n" in src
        assert f"EMBEDDING_STD = {s.embedding_std!r}\n" in src and "EMBEDDING_TRUNCATION = None\n" in src
        assert f"OUTPUT_STD = {s.head_std!r}\n" in src and f"OUTPUT_TRUNCATION = {s.head_truncation!r}\n" in src
        assert ('_EMBEDDING_INIT = {"weight": skip_param_init}' in src) == tied
        assert "std=1.0" not in src

