"""Hostile spec inputs end in one located line, exit 1, at once: never a hang, a traceback or error[INTERNAL].

* A config.json saying 1e11 layers: the families whose config class derives one attention kind (or RoPE flag) per
  layer (Gemma 2 / 3, OLMo 3, gpt-oss, SmolLM3) built that list before the 1024-layer bound refused the count
  (a hang eating gigabytes); an init_hf checkpoint saying 1e9 multi-token-prediction layers likewise.
* A FIFO given as the spec blocked in open() forever; a pipe given on purpose (``-``, ``/dev/stdin``, ``<(...)``)
  and a terminal still read.
* ``--set``: a key path or value deeper than a spec nests, or too big, was located at a line of the text llmc writes
  (``tiny_cpu.yaml:95`` of a 47-line file) or overflowed Python's recursion (error[INTERNAL]); an alias bomb in a
  value hung; an index into a missing list made a mapping (``stages: must be a list``).

The slow-on-the-old-code cases run in a subprocess with a timeout and an address-space limit, so a regression fails
the test instead of stalling the suite or the machine.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "fixtures" / "hf"
TINY = ROOT / "examples" / "tiny_cpu.yaml"
SPEC = """name: hfz
model: {hf_config: config.json}
hardware: {gpu: h100-sxm, count: 8}
data: {sources: [{name: w, path: /data/x.jsonl}], seq_len: 4096, tokens: 10B}
training: {global_batch_tokens: 4194304}
"""


def _limit_memory() -> None:  # (in the child: a regression runs out of address space instead of the machine's memory)
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def llmc(*args: str, cwd: Path, timeout: float = 20, shell: str = "") -> subprocess.CompletedProcess:
    """``llmc ARGS`` in a child process: it must end within ``timeout`` seconds (a hang fails the test as
    TimeoutExpired). ``shell``: ``llmc SHELL`` run by bash instead (process substitution, redirection)."""
    argv = [sys.executable, "-m", "llmc.cli", *args]
    cmd: list[str] = ["bash", "-c", f"{shlex.join(argv)} {shell}"] if shell else argv
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if "error[" in ln]


def one_error(r: subprocess.CompletedProcess) -> str:
    errs = error_lines(r)
    assert r.returncode == 1 and len(errs) == 1, r.stdout + r.stderr
    assert "INTERNAL" not in errs[0] and "Traceback" not in r.stderr, r.stderr
    return errs[0]


# ------------------------------------------------------------------------------ a config.json of 1e11 layers


def _config(fixture: str, drop: tuple[str, ...] = (), **keys) -> dict:
    cfg = json.loads((HF / f"{fixture}.json").read_text())
    text = cfg.get("text_config", cfg)  # (Gemma 3-4B and up: the language model's keys in text_config)
    for k in drop:
        text.pop(k, None)
    text.update(keys)
    return cfg


#: each family whose config class derives a per-layer list from num_hidden_layers when config.json gives none
#: (transformers' Gemma2Config / Gemma3TextConfig / Olmo3Config / GptOssConfig layer_types, SmolLM3Config
#: no_rope_layers), and Llama, which has none (the control)
LAYER_LIST_FAMILIES = [("gemma3-1b", ()), ("gemma3-4b", ()), ("gemma2-2b", ()), ("olmo3-7b", ("layer_types",)),
                       ("gpt-oss-20b", ("layer_types",)), ("smollm3-3b", ("no_rope_layers",)), ("llama3.2-1b", ())]


@pytest.mark.parametrize("fixture,drop", LAYER_LIST_FAMILIES, ids=[f for f, _ in LAYER_LIST_FAMILIES])
def test_a_config_of_1e11_layers_is_refused_at_once(fixture, drop, tmp_path):
    from llmc.spec.model import MAX_LAYERS

    (tmp_path / "config.json").write_text(json.dumps(_config(fixture, drop, num_hidden_layers=10**11)))
    (tmp_path / "spec.yaml").write_text(SPEC)
    for fmt in ("text", "json"):
        r = llmc("plan", "spec.yaml", "--format", fmt, cwd=tmp_path)
        assert r.returncode == 1, r.stdout + r.stderr
        if fmt == "text":
            line = one_error(r)
            assert line.startswith("spec.yaml:2: error[S005] model.hf_config: "), line
            assert f"'num_hidden_layers' must be <= {MAX_LAYERS} (got 100000000000)" in line, line
        else:
            diags = [d for d in json.loads(r.stdout)["diagnostics"] if d["severity"] == "error"]
            assert [(d["code"], d["line"]) for d in diags] == [("S005", 2)] and diags[0]["hint"], diags


def test_the_layer_bound_keeps_the_deepest_model_it_allows():
    """1024 layers is still a model (the bound refuses only more), its full-attention layers those transformers'
    Gemma3TextConfig derives: layer i attends fully where (i + 1) % sliding_window_pattern == 0."""
    from llmc.spec.hf import HFConfigError, architecture_from_hf_config

    cfg = _config("gemma3-1b", num_hidden_layers=1024)
    arch = architecture_from_hf_config(cfg)
    pattern = cfg["sliding_window_pattern"]  # 6 in the released config
    assert arch.n_layers == 1024 and arch.full_attention_layers == tuple(range(pattern - 1, 1024, pattern))
    with pytest.raises(HFConfigError, match="'num_hidden_layers' must be <= 1024"):
        architecture_from_hf_config(_config("gemma3-1b", num_hidden_layers=1025))


def test_an_init_hf_checkpoint_of_1e9_mtp_layers_is_planned_at_once(tmp_path):
    """A checkpoint's config.json is read as saved (not imported): its num_nextn_predict_layers made mtp_prefixes
    build one tensor-name prefix per MTP layer, 1e9 of them."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(_config("deepseek-v3", num_nextn_predict_layers=10**9)))
    (ck / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text((HF / "deepseek-v3.json").read_text())
    (tmp_path / "spec.yaml").write_text(SPEC + """stages:
  - name: mid
    kind: midtrain
    init_hf: ck
    data: {sources: [{name: w, path: /data/x.jsonl}], seq_len: 4096, tokens: 1B}
""")
    r = llmc("plan", "spec.yaml", cwd=tmp_path)
    assert "INTERNAL" not in r.stdout + r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "1000000000 multi-token-prediction (MTP) layers" in r.stdout + r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------------------ a spec that is not a regular file


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_fifo_as_the_spec_is_refused_without_blocking(fmt, tmp_path):
    os.mkfifo(tmp_path / "f.yaml")
    r = llmc("plan", "f.yaml", "--format", fmt, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    if fmt == "text":
        line = one_error(r)
        assert line.startswith("f.yaml: error[S000] spec is not a regular file (a FIFO)"), line
    else:
        diags = json.loads(r.stdout)["diagnostics"]
        assert [d["code"] for d in diags] == ["S000"] and "not a regular file" in diags[0]["message"], diags


def _read(path: str | Path):
    """``read_spec_bytes`` in this process, under a watchdog: a read that blocks fails the test."""
    from llmc.spec.load import read_spec_bytes

    out: list = []
    t = threading.Thread(target=lambda: out.append(read_spec_bytes(path)), daemon=True)
    t.start()
    t.join(20)
    assert out, f"reading {path} blocked"
    return out[0]


def test_a_pipe_given_on_purpose_still_reads(tmp_path):
    """What a shell passes for ``<(cat spec.yaml)`` (/dev/fd/N of a pipe) and ``/dev/stdin`` read to the writer's
    end; a link to a FIFO with no writer gives at once one S000 line saying the pipe gave nothing, never blocking."""
    data = TINY.read_bytes()
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True)
    writer.start()
    try:
        assert _read(f"/dev/fd/{r}") == data
    finally:
        os.close(r)
    os.mkfifo(tmp_path / "f.yaml")
    (tmp_path / "link.yaml").symlink_to("f.yaml")
    empty = _read(tmp_path / "link.yaml")
    assert not isinstance(empty, bytes) and "a pipe that gave nothing" in empty.diagnostics[0].message
    loaded = _read(tmp_path / "f.yaml")  # (named directly: refused, not read)
    assert not isinstance(loaded, bytes) and "not a regular file" in loaded.diagnostics[0].message
    assert "not a regular file" in _read("/dev/zero").diagnostics[0].message


def test_a_spec_piped_through_the_command_line_still_plans(tmp_path):
    """``<(cat s.yaml)`` and ``/dev/stdin`` are read as ``-`` is: the spec's relative paths (here an HF config.json
    beside it) resolve against the current directory, not /dev/fd or /dev, and a build records the spec as
    ``<stdin>``, not a /proc path its README would offer to rebuild from."""
    import json

    shutil.copy(HF / "llama3-8b.json", tmp_path / "config.json")
    (tmp_path / "s.yaml").write_text(SPEC)
    for shell in ("plan <(cat s.yaml)", "plan /dev/stdin < s.yaml", "plan - < s.yaml", "plan /dev/stdin < <(cat s.yaml)"):
        r = llmc(cwd=tmp_path, shell=shell)
        assert r.returncode == 0 and "llmc plan: hfz" in r.stdout, (shell, r.stdout + r.stderr)
    r = llmc(cwd=tmp_path, shell="build /dev/stdin -o b < <(cat s.yaml)")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "b" / "plan.lock.json").read_text())["spec"]["path"] == "<stdin>"


def test_a_terminal_still_reads(tmp_path):
    """``llmc plan /dev/tty`` (or /dev/stdin at a terminal) reads what is typed up to end of input (^D)."""
    import pty

    try:
        master, slave = pty.openpty()
    except OSError:
        pytest.skip("no pseudo-terminal here")
    try:
        for path in (f"/dev/fd/{slave}", os.ttyname(slave)):
            os.write(master, b"name: typed\n\x04")
            assert _read(path) == b"name: typed\n"
    finally:
        os.close(master)
        os.close(slave)


# ------------------------------------------------------------------------------ --set


def test_a_set_key_path_deeper_than_a_spec_nests_names_the_override(tmp_path):
    from llmc.spec.load import MAX_YAML_DEPTH

    for parts in (65, 1000):
        key = ".".join(["k"] * parts)
        line = one_error(llmc("plan", str(TINY), "--set", f"{key}=1", cwd=tmp_path))
        assert line.startswith("--set k.k.") and "error[S001]" in line and f"{parts} levels deep" in line, line
        assert f"makes {parts + 1}, more than the {MAX_YAML_DEPTH} a spec may nest" in line, line
    # 63 parts and a scalar: as deep as the loader reads (its top mapping level 1): the schema's own error
    line = one_error(llmc("plan", str(TINY), "--set", ".".join(["k"] * 63) + "=1", cwd=tmp_path))
    assert line.startswith("--set k.k.") and "unknown key 'k'" in line, line


def test_a_set_value_too_complex_for_a_spec_names_the_override():
    """Deep, recursive and alias-bomb values, checked on the override with the loader's own limits (the bomb's
    10**6 expanded values made the old comment check walk every one, and a 9-level one hung it)."""
    from llmc.overrides import OverrideError, parse_override

    names = "abcdefghij"
    bomb = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + [
        f"&{names[i]} [{','.join(['*' + names[i - 1]] * 10)}]" for i in range(1, 9)]) + "]"
    for value, why in (("[" * 63 + "]" * 63, "nesting deeper than 64 levels"), ("&a [*a]", "contains it"),
                       (bomb, "more than 20,000 values"), ("[" + ",".join(["1"] * 25_000) + "]",
                                                           "more than 20,000 values")):
        out: list = []

        def parse(value=value, out=out):
            try:
                parse_override(f"training.seed={value}")
            except OverrideError as e:
                out.append(e)

        t = threading.Thread(target=parse, daemon=True)
        t.start()
        t.join(20)
        assert out and out[0].where == "--set training.seed" and why in out[0].why, (value[:40], out)


def test_overrides_too_big_together_name_the_overrides(tmp_path):
    """Each value within the limits, the spec they make past them: the re-read text's line is no line of the file."""
    items = "[" + ",".join(["1"] * 12_000) + "]"
    line = one_error(llmc("plan", str(TINY), "--set", f"training.a={items}", "--set", f"training.b={items}",
                          cwd=tmp_path))
    assert line.startswith("--set training.a, --set training.b: error[S002] YAML too complex"), line


def test_an_index_into_a_missing_list_says_the_list_is_missing():
    from llmc.overrides import OverrideError, apply_overrides, parse_override, read_with_overrides

    with pytest.raises(OverrideError, match="stages is not in the spec, so it has no item 0") as e:
        apply_overrides({"name": "x"}, [parse_override("stages.0.name=x")])
    assert "--set 'stages=[...]'" in e.value.hint
    with pytest.raises(OverrideError, match="stages is not in the spec"):
        apply_overrides({"stages": None}, [parse_override("stages.2.name=x")])
    assert apply_overrides({"a": None}, [parse_override("a.b.c=1")]) == {"a": {"b": {"c": 1}}}  # mappings: made
    loaded = read_with_overrides(TINY, [parse_override("stages.0.name=x")])
    [d] = loaded.diagnostics
    assert (d.code, d.file, d.line) == ("S001", str(TINY), None) and "must be a list" not in d.message
    assert d.message.startswith("--set stages.0.name: stages is not in the spec") and "--set" in d.hint
