"""What a launch would refuse about a stage's start, said by the plan: an ``init_hf`` checkpoint that is not the
spec's model, misses weight files or is no folder (G021), a tokenizer larger than the model's vocabulary (G022), LoRA
targets that name no linear of the model (G023, with notes on MLA and on adapters PEFT has no layout for); a
finished stage whose ``init_hf`` checkpoint was rewritten since (refused, as a lock change is); and a failing stage's
stderr shown as llmc's one line, without torchrun's traceback and banner.

Each check is held against the real thing: the runtime loader (``llmc.runtime.hf_io``) refusing the same checkpoint,
``tokenizers`` counting the same tokens, huggingface_hub's ``validate_repo_id``, the runtime's LoRA and PEFT export,
and torchrun's own failure output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmc.cli import app, last_error_line  # noqa: E402
from llmc.compiler.stages import lora_trainable_params, peft_layout_gap  # noqa: E402
from llmc.launch import StderrRelay, launch_commands  # noqa: E402
from llmc.runtime.errors import HFError  # noqa: E402
from llmc.runtime.hf_io import SafetensorsDir, load_hf_into, peft_state_dict, read_hf_config  # noqa: E402
from llmc.runtime.job import START_KEY, fingerprint_record  # noqa: E402
from llmc.runtime.lora import apply_lora, lora_state_dict  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.spec.facts import hub_id, read_tokenizer  # noqa: E402
from llmc.spec.hf import architecture_from_hf_config  # noqa: E402
from llmc.spec.schema import LORA_HF_NAMES, LORA_TARGETS  # noqa: E402

runner = CliRunner()
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=10000.0)
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(d: Path, vocab: int = 300, extra: int = 0) -> Path:
    """A byte-level BPE trained here, with ChatML specials and ``extra`` more added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20] * 10, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=CHATML, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    return d


def make_hf(d: Path, kind: str = "llama", shard: str | None = None, **over) -> Path:
    """A random tiny Hugging Face checkpoint saved by transformers' save_pretrained."""
    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    model = model_cls(cfg_cls(**{**TINY, "vocab_size": 320, **over}))
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    return d


def spec(tmp: Path, model_cfg: str, init_hf: str, tokenizer: str = "tok", lora: str | None = None) -> Path:
    (tmp / "text.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    (tmp / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(20)))
    sft = ("\n  - name: sft\n    kind: sft\n    init_from: cpt\n    steps: 1\n    global_batch_tokens: 64\n"
           f"    lora: {{rank: 4, alpha: 8, targets: {lora}}}\n"
           "    data: {sources: [{name: chat, path: chat.jsonl, kind: chat}], seq_len: 32, tokens: 2K}") if lora else ""
    p = tmp / "run.yaml"
    p.write_text(f"""name: start-checks
model: {{hf_config: {model_cfg}}}
hardware: {{gpu: cpu, count: 1}}
data:
  sources: [{{name: txt, path: text.jsonl, format: jsonl}}]
  tokenizer: {{path: {tokenizer}, chat_template: chatml}}
  seq_len: 32
  tokens: 2K
training: {{precision: fp32, global_batch_tokens: 64, backend: native}}
stages:
  - {{name: cpt, kind: midtrain, init_hf: {init_hf}, lr: 1.0e-5, steps: 1}}{sft}
""")
    return p


def plan(p: Path) -> tuple[int, str]:
    r = runner.invoke(app, ["plan", str(p)])
    # on an error, the error lines (standard output has the whole report, the errors in its diagnostics too)
    return r.exit_code, r.stderr if r.exit_code else r.output


def diag_lines(out: str, code: str) -> list[str]:
    return [ln for ln in out.splitlines() if f"[{code}]" in ln]


# ----------------------------------------------------------------------------- G021


def test_checkpoint_of_another_model_is_a_plan_error_as_the_loader_refuses_it(tmp_path):
    make_tokenizer(tmp_path / "tok")
    make_hf(tmp_path / "llama", tie_word_embeddings=True)
    make_hf(tmp_path / "qwen2", kind="qwen2", tie_word_embeddings=False)
    arch = architecture_from_hf_config(read_hf_config(tmp_path / "llama"))
    with pytest.raises(HFError, match="not the spec's model"):  # the runtime refuses it at launch
        load_hf_into(build_model(arch), tmp_path / "qwen2", arch)
    rc, out = plan(spec(tmp_path, "llama/config.json", "qwen2"))
    (line,) = diag_lines(out, "G021")
    assert rc == 1 and "error[G021] stages.0.init_hf" in line and "run.yaml:" in line
    assert "tied_embeddings" in line and "qkv_bias" in line and "hf_config: qwen2/config.json" in line
    # its own checkpoint: nothing said
    rc, out = plan(spec(tmp_path, "llama/config.json", "llama"))
    assert rc == 0 and not diag_lines(out, "G021"), out


def test_missing_shard_is_a_plan_error_as_the_loader_fails_on_it(tmp_path):
    make_tokenizer(tmp_path / "tok")
    d = make_hf(tmp_path / "sharded", shard="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(index.values()))[1]
    (d / gone).unlink()
    with pytest.raises(FileNotFoundError):  # what the launch met
        SafetensorsDir(d)
    rc, out = plan(spec(tmp_path, "sharded/config.json", "sharded"))
    (line,) = diag_lines(out, "G021")
    assert rc == 1 and gone in line and "1 weight file(s)" in line


def test_hub_id_rule_is_huggingface_hubs(tmp_path):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    names = ["org/name", "models/does_not_exist", "Qwen/Qwen2.5-0.5B", "./models/x", "../x", "/abs/x", "a/b/c",
             "org/-bad", "org/na--me", "org/x.git", "org/..", "~/x", "org/ok_1.2", "café/x"]
    for n in names:
        try:
            validate_repo_id(n)
            valid = True
        except HFValidationError:
            valid = False
        assert hub_id(n) == (valid and n.count("/") == 1), n  # llmc's loader takes namespace/name only
    assert hub_id("org/name@main")


def test_typo_in_a_local_path_is_a_plan_error_a_hub_id_is_not_checked(tmp_path):
    make_tokenizer(tmp_path / "tok")
    make_hf(tmp_path / "models" / "llama")
    rc, out = plan(spec(tmp_path, "models/llama/config.json", "models/lama"))  # models/ is here: a typo
    (line,) = diag_lines(out, "G021")
    assert rc == 1 and "models/lama is no folder here" in line and "did you mean models/llama" in line
    assert "huggingface-cli download models/lama" not in line
    rc, out = plan(spec(tmp_path, "models/llama/config.json", "./models/lama"))  # never a Hub id
    (line,) = diag_lines(out, "G021")
    assert "cannot be a Hub id" in line
    rc, out = plan(spec(tmp_path, "models/llama/config.json", "some-org/some-model"))  # a Hub id: the cluster's cache
    assert rc == 0 and not diag_lines(out, "G021"), out


# ----------------------------------------------------------------------------- G022


def test_tokenizer_size_is_what_tokenizers_counts_and_larger_than_vocab_is_an_error(tmp_path):
    from tokenizers import Tokenizer

    d = make_tokenizer(tmp_path / "tok", vocab=300, extra=40)
    want = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert read_tokenizer("tok", tmp_path).size == want
    make_hf(tmp_path / "small", vocab_size=want - 1)
    rc, out = plan(spec(tmp_path, "small/config.json", "small"))
    (line,) = diag_lines(out, "G022")
    assert rc == 1 and f"{want:,} tokens" in line and f"vocab_size is {want - 1:,}" in line
    make_hf(tmp_path / "fits", vocab_size=want)
    rc, out = plan(spec(tmp_path, "fits/config.json", "fits"))
    assert rc == 0 and not diag_lines(out, "G022"), out


# ----------------------------------------------------------------------------- G023 and the LoRA notes


def _deepseek_config(tmp: Path) -> Path:
    cfg = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_group=2, topk_group=1, max_position_embeddings=128, tie_word_embeddings=False)
    d = tmp / "dsv3"
    cfg.save_pretrained(d)
    return d


def _runtime_lora(arch, targets) -> tuple[int, torch.nn.Module]:
    model = build_model(arch)
    try:
        n = apply_lora(model, rank=2, alpha=4, targets=targets)
    except ValueError:
        n = 0
    return n, model


def test_mla_lora_on_q_k_v_proj_is_a_plan_error_naming_the_models_linears(tmp_path):
    make_tokenizer(tmp_path / "tok")
    d = _deepseek_config(tmp_path)
    arch = architecture_from_hf_config(read_hf_config(d))
    targets = [LORA_HF_NAMES[t] for t in ("q_proj", "k_proj", "v_proj")]
    # the runtime adapts nothing (the stage would fail: "optimizer got an empty parameter list")
    assert _runtime_lora(arch, targets)[0] == 0 == lora_trainable_params(arch, 2, targets)
    rc, out = plan(spec(tmp_path, "dsv3/config.json", "some-org/dsv3", lora="[q_proj, k_proj, v_proj]"))
    (line,) = diag_lines(out, "G023")
    assert rc == 1 and "stages.1.lora.targets" in line
    for name in ("wo (o_proj)", "wq_a (q_a_proj)", "wq_b (q_b_proj)", "wkv_a (kv_a_proj_with_mqa)", "wkv_b (kv_b_proj)"):
        assert name in line
    # all-linear: trains, the plan's count is the runtime's, and the notes say what the attention adapts and that
    # no PEFT adapter is written
    n, _ = _runtime_lora(arch, list(LORA_TARGETS))
    assert n == lora_trainable_params(arch, 2, list(LORA_TARGETS)) > 0
    rc, out = plan(spec(tmp_path, "dsv3/config.json", "some-org/dsv3", lora="all-linear"))
    assert rc == 0, out
    assert "LoRA on MLA attention adapts wo only" in out and "no PEFT adapter is exported" in out


@pytest.mark.parametrize("kind,targets", [
    ("llama", list(LORA_TARGETS)), ("phi3", ["wq"]), ("mixtral", list(LORA_TARGETS)), ("mixtral", ["wq", "wo"]),
    ("deepseek_v3", ["wo"]), ("deepseek_v3", ["wo", "w1"])])
def test_peft_layout_note_is_where_the_export_refuses_the_adapter(tmp_path, kind, targets):
    if kind == "deepseek_v3":
        cfg = read_hf_config(_deepseek_config(tmp_path))
    else:
        cls = {"llama": transformers.LlamaConfig, "phi3": transformers.Phi3Config,
               "mixtral": transformers.MixtralConfig}[kind]
        extra = {"num_local_experts": 3, "num_experts_per_tok": 2} if kind == "mixtral" else {}
        cls(**{**TINY, "vocab_size": 320, **extra}).save_pretrained(tmp_path / kind)
        cfg = read_hf_config(tmp_path / kind)
    arch = architecture_from_hf_config(cfg)
    _, model = _runtime_lora(arch, targets)
    try:
        peft_state_dict(lora_state_dict(model), arch)
        refused = False
    except HFError:
        refused = True
    assert (peft_layout_gap(arch, targets) is not None) == refused


# ----------------------------------------------------------------------------- a rewritten init_hf checkpoint


def test_finished_stage_from_a_rewritten_checkpoint_is_refused_not_skipped(tmp_path):
    make_tokenizer(tmp_path / "tok")
    d = make_hf(tmp_path / "cur")
    p = spec(tmp_path, "cur/config.json", "cur", lora="[q_proj, v_proj]")
    b = tmp_path / "build"
    r = runner.invoke(app, ["build", str(p), "-o", str(b)])
    assert r.exit_code == 0, r.output
    lock = json.loads((b / "plan.lock.json").read_text())
    for name in ("cpt", "sft"):  # what a trainer writes when the stage finishes
        (b / "run" / name).mkdir(parents=True)
        record = fingerprint_record(lock, name, b)
        assert record[START_KEY]["init_hf"] == "cur"  # sft's weights come from cpt's init_hf
        (b / "run" / name / "DONE.json").write_text(json.dumps(record))
    cmds = {c.stage: c for c in launch_commands(b) if c.stage != "prepare"}
    assert cmds["cpt"].skip_reason and cmds["sft"].skip_reason and not cmds["cpt"].stale
    # the same weights copied in again without their times (cp without -p, a restore): still finished
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    w.write_bytes(bytes(data))
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cmds = {c.stage: c for c in launch_commands(b) if c.stage != "prepare"}
    assert cmds["cpt"].skip_reason and cmds["sft"].skip_reason and not cmds["cpt"].stale
    # the same path, new weights of the same size: refused
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    cmds = {c.stage: c for c in launch_commands(b) if c.stage != "prepare"}
    for name in ("cpt", "sft"):
        assert cmds[name].stale and "model.safetensors" in cmds[name].stale, name
        assert f"--no-resume --from {name}" in cmds[name].stale and "other weights" in cmds[name].stale
    # a changed config.json is named too
    (d / "config.json").write_text((d / "config.json").read_text() + "\n")
    assert "config.json" in {c.stage: c for c in launch_commands(b)}["cpt"].stale


# ----------------------------------------------------------------------------- a failing stage's stderr


def test_torchrun_failure_shows_one_line_and_keeps_the_report_in_the_log(tmp_path):
    (tmp_path / "fails.py").write_text(
        "import sys\nprint('warning[R005] kept', file=sys.stderr)\n"
        "print('plan.lock.json: error[R002] cpt: broken start', file=sys.stderr)\n"
        "raise SystemExit(1)\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "1", str(tmp_path / "fails.py")],
                       capture_output=True, cwd=tmp_path, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and b"ChildFailedError" in r.stderr and b"=====" in r.stderr  # torchrun's report
    relay = StderrRelay()
    shown = b"".join(relay.feed(r.stderr[i:i + 7]) for i in range(0, len(r.stderr), 7)) + relay.close(failed=True)
    text = shown.decode()
    assert "warning[R005] kept" in text
    for noise in ("Traceback", "ChildFailedError", "=====", "Root Cause", "error[R002]", "torch/distributed"):
        assert noise not in text, (noise, text)
    # the launch's one line says the stage's own error, read from the whole log
    assert "error[R002] cpt: broken start" in last_error_line(r.stderr.decode())
    # a stage that succeeds shows its error-looking lines after all
    relay = StderrRelay()
    assert b"error[R002] x" in relay.feed(b"error[R002] x\nok\n") + relay.close(failed=False)


def test_the_relay_hides_a_ranks_traceback_after_the_process_group_is_up(tmp_path):
    """After ``init_process_group`` torch.distributed's excepthook prefixes every traceback line with "[rankN]: ";
    the relay still keeps the whole traceback off the terminal (a CUDA OOM, an NCCL error), and the error line
    reaches the log."""
    import subprocess
    import sys

    code = ("import torch.distributed as dist\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
            "def deep():\n    raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
            "deep()\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).stderr
    assert b"[rank0]: Traceback (most recent call last):" in err, err[-2000:]
    relay = StderrRelay()
    shown = relay.feed(err) + relay.close(failed=True)
    assert b"Traceback" not in shown and b'File "' not in shown and b"CUDA out of memory" not in shown, shown
