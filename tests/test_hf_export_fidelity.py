"""What a launch started from one's own Hugging Face checkpoint hands back, checked with transformers, PEFT and vLLM:
a long_context stage from ``init_hf`` runs with its YaRN extension (the checkpoint checked against the model it was)
and exports it; exports keep the checkpoint's generation_config.json and end-of-sequence ids, adding the turn-end
token of a chat template the stage trained; a LoRA adapter names the same base from the launch and from
``llmc export -o``; and a LoRA stage whose adapter has no PEFT layout says so and records it.

Tiny checkpoints (a byte-level BPE tokenizer with ChatML specials, random Qwen3 / Llama / Phi-3 weights) are made
here with transformers; the stages run through ``llmc build`` and ``llmc launch`` on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
VENV_BIN = Path(sys.executable).parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<|eot|>"]  # ids 0..4
BOS, IM_END, EOT = 3, 2, 4
ORIGIN_EOS = [0, EOT]  # the checkpoint's own end ids: <|endoftext|> and a turn end llmc's templates do not use
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}

pytestmark = pytest.mark.slow


def _llmc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with data/ (text and chat JSONL) and tok/ (the tokenizer every checkpoint here uses)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("fidelity")
    texts = [p.read_text() for p in (ROOT / "README.md", ROOT / "llmc" / "runtime" / "hf_io.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.save_pretrained(d / "tok")
    (d / "data").mkdir()
    paras = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 200]
    (d / "data" / "text.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras * 4))
    chats = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                           {"role": "assistant", "content": str(a + b)}]} for a in range(40) for b in (3, 17)]
    (d / "data" / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return d


def _checkpoint(work: Path, name: str, model_type: str, **over) -> Path:
    """A random tiny HF checkpoint with an instruct model's generation_config.json (several end ids, sampling
    defaults, a pad id) and the shared tokenizer."""
    import shutil

    torch.manual_seed(0)
    vocab = json.loads((work / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = transformers.AutoConfig.for_model(model_type, **{
        "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "bos_token_id": BOS, "eos_token_id": ORIGIN_EOS, "pad_token_id": 0, **over})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms not all ones
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS, eos_token_id=ORIGIN_EOS,
                                                            pad_token_id=0, **SAMPLING)
    out = work / "models" / name
    model.save_pretrained(out)
    for f in (work / "tok").iterdir():
        shutil.copy(f, out / f.name)
    return out


def _build_and_launch(work: Path, name: str, spec: str) -> tuple[Path, subprocess.CompletedProcess]:
    (work / f"{name}.yaml").write_text(spec)
    r = _llmc("build", f"{name}.yaml", "-o", f"b_{name}", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _llmc("launch", f"b_{name}", cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work / f"b_{name}", r


def _hf_logits(path: Path, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    if config is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:  # the same weights under another config.json
        cfg = transformers.AutoConfig.for_model(**config)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected  # (tied: the embedding)
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_long_context_stage_from_init_hf_runs_with_yarn_and_exports_it(work, backend):
    """A long_context stage starting from the spec's own checkpoint (``model: {hf_config: ...}``) loads it (checked
    against the model it is, without RoPE scaling), trains with YaRN, and exports a config.json with that YaRN, which
    transformers loads with the trained model's logits over positions past the checkpoint's 64-token context."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    from llmc.runtime.checkpoint import load_model_weights
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model

    src = _checkpoint(work, "qwen3", "qwen3", head_dim=16, tie_word_embeddings=True)
    b, _ = _build_and_launch(work, f"lc_{backend}", textwrap.dedent(f"""\
        name: lc
        model: {{hf_config: {src}/config.json}}
        hardware: {{gpu: cpu, count: 1}}
        data: {{sources: [{{name: txt, path: data/text.jsonl, format: jsonl}}], tokenizer: {{path: {src}}},
               seq_len: 64, tokens: 2K}}
        training: {{precision: fp32, global_batch_tokens: 256, backend: {backend}}}
        stages:
          - name: lc
            kind: long_context
            init_hf: {src}
            seq_len: 128
            lr: 1.0e-3
            steps: 2
            global_batch_tokens: 256
            rope_scaling: {{type: yarn, factor: 2}}
            data: {{sources: [{{name: txt, path: data/text.jsonl, format: jsonl}}], seq_len: 128, tokens: 2K}}
        """))
    hf = b / "run" / "lc" / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    rs = cfg["rope_scaling"]
    assert (rs["rope_type"], rs["factor"], rs["original_max_position_embeddings"]) == ("yarn", 2.0, 64)
    job = TrainJob.from_lock(json.loads((b / "plan.lock.json").read_text()), "lc", build_dir=b)
    trained = build_model(job.arch).eval()
    load_model_weights(trained, b / "run" / "lc")
    x = torch.randint(5, cfg["vocab_size"], (2, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained(x)
    torch.testing.assert_close(_hf_logits(hf, x), ours, atol=1e-4, rtol=1e-4)
    # (the YaRN is what makes them equal: the same weights without it give other logits)
    plain = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "architectures", "torch_dtype")}
    assert (_hf_logits(hf, x, plain) - ours).abs().max() > 1e-3


def _generation(path: Path) -> transformers.GenerationConfig:
    return transformers.GenerationConfig.from_pretrained(path)


def test_exports_keep_the_checkpoints_generation_config_and_adapters_name_their_base(work):
    """Continued pre-training from an instruct checkpoint, then a ChatML LoRA SFT stage on it (init_from), and one
    straight from the checkpoint (init_hf): every export keeps the checkpoint's sampling defaults, pad id and end ids
    (transformers' GenerationConfig and config.json), the chat stages adding <|im_end|>; ``llmc export -o`` writes the
    same, and its PEFT adapter names the same base as the launch's, which PEFT loads it on."""
    peft = pytest.importorskip("peft")
    src = _checkpoint(work, "inst", "llama", tie_word_embeddings=False)
    chat = ("data: {sources: [{name: chat, path: data/chat.jsonl, kind: chat}], seq_len: 64, tokens: 2K}")
    lora = "lora: {rank: 4, alpha: 8, dropout: 0.0, targets: [wq, wv, w2]}"
    b, _ = _build_and_launch(work, "inst", textwrap.dedent(f"""\
        name: inst
        model: {{hf_config: models/inst}}
        hardware: {{gpu: cpu, count: 1}}
        data: {{sources: [{{name: txt, path: data/text.jsonl, format: jsonl}}],
               tokenizer: {{path: models/inst, chat_template: chatml}}, seq_len: 64, tokens: 2K}}
        training: {{precision: fp32, global_batch_tokens: 128, backend: native}}
        stages:
          - {{name: cpt, kind: midtrain, init_hf: models/inst, lr: 1.0e-3, steps: 1}}
          - {{name: sft, kind: sft, init_from: cpt, lr: 1.0e-2, steps: 1, global_batch_tokens: 128, {lora},
             {chat}}}
          - {{name: sft2, kind: sft, init_hf: models/inst, lr: 1.0e-2, steps: 1, global_batch_tokens: 128, {lora},
             {chat}}}
        """))
    origin = _generation(src)
    run = b / "run"
    want = {"cpt": ORIGIN_EOS, "sft": [*ORIGIN_EOS, IM_END], "sft2": [*ORIGIN_EOS, IM_END]}
    for stage, eos in want.items():
        r = _llmc("export", "b_inst", "--stage", stage, "-o", f"exp_{stage}", cwd=work)
        assert r.returncode == 0, r.stderr
        for hf in (run / stage / "hf", work / f"exp_{stage}"):
            gen = _generation(hf)
            assert (gen.do_sample, gen.temperature, gen.top_p, gen.pad_token_id, gen.bos_token_id) == (
                origin.do_sample, origin.temperature, origin.top_p, origin.pad_token_id, origin.bos_token_id), hf
            assert gen.eos_token_id == eos, hf
            cfg = transformers.AutoConfig.from_pretrained(hf)
            assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (eos, 0, BOS), hf
    # the adapters: the launch's and the -o copy's name the same base, the model each stage started from
    for stage, base in (("sft", run / "cpt" / "hf"), ("sft2", src)):
        named = [json.loads((d / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
                 for d in (run / stage / "hf", work / f"exp_{stage}")]
        assert named == [str(base.resolve())] * 2, named
        x = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            adapted = peft.AutoPeftModelForCausalLM.from_pretrained(str(work / f"exp_{stage}" / "adapter"),
                                                                    dtype=torch.float32).eval()(input_ids=x).logits
        torch.testing.assert_close(adapted, _hf_logits(work / f"exp_{stage}", x), atol=1e-4, rtol=1e-4)

    if not (ROOT / ".venv-vllm/.installed").exists():  # scripts/setup.sh marks it complete
        return
    # vLLM's own reading of the folders (its ModelConfig: sampling defaults and the generation config's end ids)
    probe = textwrap.dedent("""\
        import json, sys
        from vllm.config import ModelConfig
        out = {}
        for p in sys.argv[1:]:
            mc = ModelConfig(model=p, tokenizer=p, dtype="auto", generation_config="auto")
            out[p] = [mc.get_diff_sampling_param(), mc.try_get_generation_config().get("eos_token_id")]
        print(json.dumps(out))
        """)
    paths = [str(src), str(run / "cpt" / "hf"), str(work / "exp_sft")]
    r = subprocess.run([str(VLLM_PYTHON), "-c", probe, *paths], env=ENV, capture_output=True, text=True,
                       timeout=600, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen[paths[0]] == [{"temperature": 0.6, "top_p": 0.9}, ORIGIN_EOS]
    assert seen[paths[1]] == seen[paths[0]]
    assert seen[paths[2]] == [{"temperature": 0.6, "top_p": 0.9}, [*ORIGIN_EOS, IM_END]]


def test_a_lora_adapter_without_a_peft_layout_is_said_and_recorded(work):
    """Phi-3's fused q/k/v has no PEFT adapter layout here: the launch says so and DONE.json records it, and
    ``llmc export -o`` says so and records it in the export's own record; the merged model is exported."""
    src = _checkpoint(work, "phi3", "phi3", partial_rotary_factor=0.5, tie_word_embeddings=False)
    b, launched = _build_and_launch(work, "phi3", textwrap.dedent(f"""\
        name: phi
        model: {{hf_config: {src}/config.json}}
        hardware: {{gpu: cpu, count: 1}}
        data: {{sources: [{{name: txt, path: data/text.jsonl, format: jsonl}}],
               tokenizer: {{path: {src}, chat_template: chatml}}, seq_len: 64, tokens: 2K}}
        training: {{precision: fp32, global_batch_tokens: 128, backend: native}}
        stages:
          - name: sft
            kind: sft
            init_hf: {src}
            lr: 1.0e-2
            steps: 1
            global_batch_tokens: 128
            lora: {{rank: 4, alpha: 8, dropout: 0.0, targets: all-linear}}
            data: {{sources: [{{name: chat, path: data/chat.jsonl, kind: chat}}], seq_len: 64, tokens: 2K}}
        """))
    done = json.loads((b / "run" / "sft" / "DONE.json").read_text())
    assert "fused" in done["adapter_note"] and "adapter" not in done
    assert done["adapter_note"] in launched.stdout + launched.stderr
    r = _llmc("export", "b_phi3", "--stage", "sft", "-o", "exp_phi3", cwd=work)
    assert r.returncode == 0, r.stderr
    assert done["adapter_note"] in r.stdout + r.stderr
    out = work / "exp_phi3"
    assert json.loads((out / ".llmc-export.json").read_text())["adapter_note"] == done["adapter_note"]
    assert not (out / "adapter").exists() and (out / "model.safetensors").exists()
