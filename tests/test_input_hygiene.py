"""What a spec accepts means the same thing everywhere it lands (security review, low-severity findings):

- Kubernetes expands ``$(VAR)`` and halves ``$$`` in a container's ``env`` values, ``command`` and ``args``; the
  shell launchers and SkyPilot export ``cluster.env`` literally. The TrainJob must give the pod the spec's values too:
  checked with a reference expander written from the API's own rule, against the launchers run by bash and the
  export lines SkyPilot's own code writes.
- ``--set`` values are read as YAML: a `` #`` comment YAML would drop, or a number only YAML 1.1 reads so, is an
  error naming the override (the premise checked against PyYAML itself).
- Absurd optimizer settings plan with a warning (T040-T042), at any model size: the bounds flag values that make
  ``torch.optim.AdamW`` produce non-finite weights, and no published recipe among the examples.
- ``eval.tasks`` names outside lm-evaluation-harness's character set are refused at load, one located line; every
  name of the installed harness's task files passes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmc.cli import app

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- Kubernetes $(VAR)


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of a container's env value / command / args, written from its definition: "Variable
    references $(VAR_NAME) are expanded using the previously defined environment variables in the container ... If a
    variable cannot be resolved, the reference in the input string will be unchanged. Double $$ are reduced to a
    single $, which allows for escaping the $(VAR_NAME) syntax" (https://kubernetes.io/docs/reference/kubernetes-api/
    workload-resources/pod-v1/#environment-variables), scanned left to right as kubernetes/kubernetes
    third_party/forked/golang/expansion/expand.go does (a ``$`` before any other character, or last, stays)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
            elif nxt == "(" and ")" in text[i + 2:]:
                j = text.index(")", i + 2)
                name = text[i + 2:j]
                out.append(env[name] if name in env else text[i:j + 1])
                i = j + 1
            else:
                out.append(text[i:i + 2])
                i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def pod_env(trainer: dict, given: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment from the TrainJob trainer's ``env``, each value expanded with the ones before it
    (``given``: variables defined before them, as the runtime's own)."""
    env = dict(given or {})
    for e in trainer["env"]:
        env[e["name"]] = kubelet_expand(e["value"], env)
    return env


def test_reference_expander_follows_the_documented_examples():
    env = {"VAR_NAME": "x", "A": "1"}
    assert kubelet_expand("$(VAR_NAME)", env) == "x"
    assert kubelet_expand("$$(VAR_NAME)", env) == "$(VAR_NAME)"  # "will produce the string literal"
    assert kubelet_expand("$(NOPE)", env) == "$(NOPE)"  # unresolved: unchanged
    assert kubelet_expand("a$$b$c$", env) == "a$b$c$"
    assert kubelet_expand("$(A", env) == "$(A"


# what the shell would expand, what Kubernetes would expand, and the escape of each
SITE_ENV = {
    "NCCL_REF": "$(LLMC_RUN_DIR)",
    "NCCL_DOUBLE": "a$$b",
    "NCCL_LONE": "$",
    "NCCL_MIX": "$$(LLMC_BUILD_DIR)$(RUN_ID)$X${HOME}$(",
    "NCCL_TAIL": "x$",
}
K8S_SPEC = """
name: dollars
model: llama3-8b
hardware: {gpu: h100-sxm, count: 16, gpus_per_node: 8}
data: {seq_len: 4096, tokens: 10B}
cluster:
  env: ENV
""".replace("ENV", json.dumps(SITE_ENV))


@pytest.fixture(scope="module")
def dollar_build(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dollars")
    (d / "spec.yaml").write_text(K8S_SPEC)
    r = CliRunner().invoke(app, ["build", str(d / "spec.yaml"), "-o", str(d / "build")])
    assert r.exit_code == 0, r.output[-3000:]
    return d / "build"


def test_trainjob_gives_the_pod_the_spec_env_values_literally(dollar_build):
    from llmc.emit.kubeflow import BUILD_DIR, COMMAND, RUN_DIR

    doc = yaml.safe_load((dollar_build / "kubeflow/trainjob.yaml").read_text())
    trainer = doc["spec"]["trainer"]
    # whatever the runtime defines before them (the torch plugin's PET_*), the values come out as written
    for given in ({}, {"X": "runtime", "HOME": "/root", "PET_NNODES": "2"}):
        env = pod_env(trainer, given)
        assert {k: env[k] for k in SITE_ENV} == SITE_ENV
        assert env["LLMC_RUN_DIR"] == RUN_DIR and env["LLMC_BUILD_DIR"] == BUILD_DIR and env["RUN_ID"] == "dollars"
        # the command bash runs in the pod is the launcher script as written, its own $ kept for bash
        assert [kubelet_expand(a, env) for a in trainer["command"]] == ["bash", "-c"]
        (script,) = [kubelet_expand(a, env) for a in trainer["args"]]
        assert script == COMMAND % {"gpn": 8}
        assert '"${PET_NNODES:-1}"' in script and 'wait "$group"' in script


def test_launchers_and_skypilot_export_the_same_values(dollar_build, tmp_path):
    """The other targets already set the literal value: the shell launcher under bash, and SkyPilot's own loader and
    export lines (sky/skylet/log_lib.py ``make_task_bash_script``: ``export K=shlex.quote(v)``)."""
    text = (dollar_build / "launch/torchrun_multi_node.sh").read_text()
    lines = [ln for ln in text.splitlines() if re.match(r"\[\[ -v NCCL_[A-Z]+ \]\] \|\| export ", ln)]
    probe = "\n".join(lines) + '\nfor v in ' + " ".join(SITE_ENV) + '; do printf "%s\\0" "${!v}"; done\n'
    env = {k: v for k, v in os.environ.items() if k not in SITE_ENV}
    r = subprocess.run(["bash", "-c", probe], capture_output=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode().split("\0")[:-1] == list(SITE_ENV.values()), r.stderr

    from test_cluster_manifests import _sky_python

    sky = _sky_python()
    if sky is None:
        pytest.skip("skypilot is not installed (scripts/setup.sh makes .venv-sky)")
    code = """
import sys, yaml, sky
from sky.skylet.log_lib import make_task_bash_script
task = sky.Task.from_yaml_config(yaml.safe_load(open(sys.argv[1])), env_overrides=[
    ("LLMC_PACKAGE", "x"), ("LLMC_RUN_DIR", "/shared/run")])
script = make_task_bash_script("true", env_vars=dict(task.envs))
print("\\n".join(ln for ln in script.splitlines() if ln.startswith("export NCCL_")))
"""
    out = subprocess.run([sky, "-c", code, str(dollar_build / "skypilot/task.yaml")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = out.stdout + '\nfor v in ' + " ".join(SITE_ENV) + '; do printf "%s\\0" "${!v}"; done\n'
    r = subprocess.run(["bash", "-c", probe], capture_output=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode().split("\0")[:-1] == list(SITE_ENV.values()), r.stderr


# --------------------------------------------------------------------------------------------- --set as YAML

TINY = """name: r1
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources: [{name: python-docs, format: builtin}]
  tokenizer: {train: true, vocab_size: 512}
  seq_len: 64
  tokens: 20480
training:
  global_batch_tokens: 2048
  checkpoint: {interval_steps: 2, keep_latest: 1}
  log_every: 2
"""


def _plan(tmp_path: Path, *sets: str, spec: str = TINY):
    f = tmp_path / "spec.yaml"
    f.write_text(spec)
    args = ["plan", str(f)]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("value, lost", [
    ("/tmp/x/tok #2", "#2"),
    ("[1, 2] # three", "# three"),
    ("#x", "#x"),
])
def test_a_set_value_holding_a_yaml_comment_is_refused(value, lost):
    from llmc.overrides import OverrideError, parse_override

    assert yaml.safe_load(value) != value  # the premise: PyYAML drops the comment
    with pytest.raises(OverrideError) as e:
        parse_override(f"data.tokenizer.path={value}")
    assert e.value.where == "--set data.tokenizer.path" and repr(lost) in e.value.why
    # the quoted form the hint gives is taken, as typed
    quoted = re.search(r"--set '([^']*)'", e.value.why).group(1)
    assert parse_override(quoted).value == value


def test_the_reviewers_override_is_one_located_error(tmp_path):
    r = _plan(tmp_path, "data.tokenizer.path=/tmp/x/tok #2")
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if "error[" in ln]
    assert len(lines) == 1 and lines[0].startswith("--set data.tokenizer.path: error[S001]"), r.output
    assert "quote the value" in lines[0] and "#2" in lines[0]


@pytest.mark.parametrize("value", ["a#b", '"a #b"', "'a #b'", "0x10", "1_000", "3e-4", "[1, 2]", "0", "-7", "0.5"])
def test_values_yaml_reads_as_typed_are_taken(value):
    from llmc.overrides import parse_override

    got = parse_override(f"a.b={value}").value
    assert got == (float(value) if value == "3e-4" else yaml.safe_load(value))


@pytest.mark.parametrize("value, yaml11, yaml12", [("010", 8, 10), ("1:30", 90, "1:30"), ("[1, 010]", [1, 8], [1, 10])])
def test_numbers_only_yaml_1_1_reads_so_are_refused(value, yaml11, yaml12):
    from llmc.overrides import OverrideError, parse_override

    assert yaml.safe_load(value) == yaml11  # PyYAML (YAML 1.1); YAML 1.2's core schema reads yaml12
    with pytest.raises(OverrideError) as e:
        parse_override(f"training.seed={value}")
    assert "YAML 1.1" in e.value.why
    # a scalar: quote the value; an item of a list: quote that item (the whole value quoted would be a string)
    assert ("quote that item" if isinstance(yaml11, list) else "quote the value") in e.value.why


def test_a_yaml_boolean_for_a_string_is_refused_by_the_spec(tmp_path):
    """``yes`` -> True where a path belongs: the spec's validation already refuses it, located at the override."""
    r = _plan(tmp_path, "data.tokenizer.path=yes")
    assert r.exit_code == 1 and "--set data.tokenizer.path: error[S002]" in r.output, r.output


# --------------------------------------------------------------------------------------------- absurd hyperparameters


def _warnings(output: str, code: str) -> list[str]:
    return [ln.strip() for ln in output.splitlines() if f"warning[{code}]" in ln]


@pytest.mark.parametrize("override, code", [
    ("training.optimizer.lr=1e308", "T040"),
    ("training.optimizer.lr=1e-9", "T040"),
    ("training.optimizer.weight_decay=1e300", "T041"),
    ("training.optimizer.eps=1", "T042"),
    ("training.z_loss=5", "T042"),
    ("training.grad_clip=1e-300", "T042"),
])
def test_absurd_hyperparameters_plan_with_a_located_warning(tmp_path, override, code):
    r = _plan(tmp_path, override)
    assert r.exit_code == 0 and " 0 error(s)" in r.output, r.output
    key = override.split("=")[0]
    (line,) = _warnings(r.output, code)
    assert line.startswith(f"--set {key}: warning[{code}]"), line


def test_plausible_values_do_not_warn(tmp_path):
    r = _plan(tmp_path, "training.optimizer.lr=3e-3", "training.optimizer.weight_decay=0.1", "training.z_loss=1e-4")
    assert r.exit_code == 0 and not any(_warnings(r.output, c) for c in ("T040", "T041", "T042")), r.output


def test_the_bounds_flag_values_that_wreck_adamw():
    """torch.optim.AdamW itself: the reviewer's lr 1e308 and weight decay 1e300 leave non-finite weights within two
    steps; a value inside the bounds (the published ones) keeps them finite."""
    torch = pytest.importorskip("torch")
    from llmc.compiler.checks import PLAUSIBLE_LR, PLAUSIBLE_WEIGHT_DECAY

    def train(lr: float, wd: float) -> bool:
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
        x = torch.randn(16, 8)
        for _ in range(2):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in m.parameters()) and float(m(x).pow(2).mean()) < 1e6

    assert not train(1e308, 0.1) and 1e308 > PLAUSIBLE_LR[1]
    assert not train(3e-4, 1e300) and 1e300 > PLAUSIBLE_WEIGHT_DECAY
    assert train(3e-4, 0.1) and train(PLAUSIBLE_LR[1] / 10, PLAUSIBLE_WEIGHT_DECAY / 10)


def test_no_published_recipe_among_the_examples_warns():
    from llmc.compiler import params
    from llmc.compiler.checks import Sink, check_plausible_hyper
    from llmc.spec.load import load_spec, loads_spec

    gpt_oss = TINY.replace("model: tiny", f"model: {{hf_config: {ROOT}/tests/fixtures/hf/gpt-oss-20b.json}}")
    runs = [load_spec(f) for f in sorted((ROOT / "examples").glob("*.yaml"))] + [loads_spec(gpt_oss)]
    assert any(r.model.moe is not None and r.model.moe.aux_loss_coef == 0.9 for r, _ in runs)  # gpt-oss's config
    for run, lines in runs:
        sink = Sink(lines, run.name)
        check_plausible_hyper(run, params.params_active(run.model), sink)
        assert not sink.items, (run.name, [d.render() for d in sink.items])


def test_stage_lrs_warn_once():
    """A pretrain stage's absurd LR gets T040; a full SFT's gets T101 (already), not both; a tiny one gets T040."""
    from llmc.compiler import params
    from llmc.compiler.checks import Sink, check_plausible_hyper
    from llmc.spec.load import loads_spec

    spec = TINY + ("stages:\n  - {name: pt, kind: pretrain, lr: 1.0e+300}\n"
                   "  - {name: ft, kind: sft, init_from: pt, lr: 1.0e+300, data: {sources: [{name: c, kind: chat, "
                   "format: builtin}], seq_len: 64, tokens: 20480}}\n"
                   "  - {name: lo, kind: sft, init_from: ft, lr: 1.0e-9, data: {sources: [{name: c, kind: chat, "
                   "format: builtin}], seq_len: 64, tokens: 20480}}\n")
    run, lines = loads_spec(spec)
    sink = Sink(lines, "s.yaml")
    check_plausible_hyper(run, params.params_active(run.model), sink)
    assert sorted((d.code, d.path) for d in sink.items) == [("T040", "stages.0.lr"), ("T040", "stages.2.lr")]


# --------------------------------------------------------------------------------------------- eval task names


def test_an_eval_task_name_lm_eval_cannot_hold_is_one_located_error(tmp_path):
    r = _plan(tmp_path, spec=TINY + 'eval:\n  tasks: ["hellaswag; touch /tmp/x/pwned4"]\n')
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if "error[" in ln]
    assert len(lines) == 1, r.output
    line = TINY.count("\n") + 2  # the tasks: line
    assert re.match(rf".*spec\.yaml:{line}: error\[S002\] eval\.tasks\.0: .*not an lm-evaluation-harness task name",
                    lines[0]), lines[0]
    assert not Path("/tmp/x/pwned4").exists()


@pytest.mark.parametrize("name", ["hellaswag; x", "a,b", "-x", "a b", "arc:easy", "$(x)", "mmlu/abstract"])
def test_names_outside_the_harness_character_set_are_refused(name):
    from pydantic import ValidationError

    from llmc.spec.schema import Eval

    with pytest.raises(ValidationError):
        Eval(tasks=[name])


def test_every_name_of_the_installed_harness_passes():
    """Every ``task:`` / ``group:`` / ``tag:`` name of lm-evaluation-harness's own task files, glob patterns as
    ``lm_eval --tasks`` matches them (fnmatch), and local task files are accepted."""
    from llmc.spec.schema import Eval

    spec = find_spec("lm_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lm-evaluation-harness is not installed")
    pat = re.compile(r"^(?:task|group|tag):[ \t]*([^\s#'\"].*?)[ \t]*$", re.M)
    names = {m.group(1) for f in (Path(spec.origin).parent / "tasks").rglob("*.yaml")
             for m in pat.finditer(f.read_text(errors="replace"))}
    assert len(names) > 1000 and "hellaswag" in names
    Eval(tasks=sorted(names) + ["mmlu_*", "arc_[ce]*", "evals/my task.yaml", "tasks/x.yml"])


@pytest.mark.parametrize("doc", ['task: "a,b; touch x"\n', 'group: "g h"\ntask: [hellaswag]\n'])
def test_a_local_task_files_own_name_is_held_to_the_same_character_set(tmp_path, doc):
    """lm_eval is run with the name a local task file declares (its ``task:``, or a group file's ``group:``), not
    with the file's path: that name is checked as ``eval.tasks`` names are."""
    from llmc.spec.facts import read_eval_task

    (tmp_path / "t.yaml").write_text(doc)
    f = read_eval_task("t.yaml", tmp_path)
    assert f.problem is not None and "not an lm-evaluation-harness task name" in f.problem, f
    (tmp_path / "ok.yaml").write_text("task: my_task-1.0\n")
    assert read_eval_task("ok.yaml", tmp_path).problem is None


def test_octal_refusal_keeps_the_sign_and_a_list_is_not_told_to_become_a_string():
    from llmc.overrides import OverrideError, parse_override

    with pytest.raises(OverrideError) as e:
        parse_override("training.seed=-010")
    assert f"but {-int('10')} to YAML 1.2" in str(e.value) and yaml.safe_load("-010") == -8
    with pytest.raises(OverrideError) as e:
        parse_override("data.sources.0.files=[010, 2]")
    msg = str(e.value)
    assert "quote that item" in msg and '"[010, 2]"' not in msg  # quoting the whole value would make it a string


@pytest.mark.parametrize(("text", "yaml12"), [("010", 10), ("-0_17", -17), ("1:30", "1:30"), ("2:05.5", "2:05.5")])
def test_a_spec_file_number_yaml_1_1_and_1_2_read_differently_is_refused_on_its_line(tmp_path, text, yaml12):
    """PyYAML reads the spec as YAML 1.1 (``010`` -> 8, ``1:30`` -> 90); YAML 1.2's core schema, which every other
    reader and a person use, reads a decimal ``[-+]?[0-9]+`` (https://yaml.org/spec/1.2.2/#1032-tag-resolution) and
    leaves ``1:30`` text. A spec file holding one is S010 on its line, as a ``--set`` value is refused."""
    loaded = yaml.safe_load(f"v: {text}")["v"]
    assert loaded != yaml12  # the two readings differ (the premise)
    spec = (ROOT / "examples" / "tiny_cpu.yaml").read_text().replace("training:\n", f"training:\n  seed: {text}\n", 1)
    (tmp_path / "s.yaml").write_text(spec)
    line = spec.splitlines().index(f"  seed: {text}") + 1
    r = CliRunner().invoke(app, ["plan", str(tmp_path / "s.yaml")])
    assert r.exit_code == 1, r.output
    assert f"s.yaml:{line}: error[S010] training.seed: {text!r}" in r.output and "Traceback" not in r.output
    # the same value given as --set is the same code (it was S001: a tool keyed on S010 missed it)
    r = CliRunner().invoke(app, ["plan", str(ROOT / "examples" / "tiny_cpu.yaml"), "--set", f"training.seed={text}"])
    assert r.exit_code == 1 and "--set training.seed: error[S010] value" in r.output, r.output
    r = CliRunner().invoke(app, ["plan", str(ROOT / "examples" / "tiny_cpu.yaml"), "--set", "training.seed=10 #x"])
    assert r.exit_code == 1 and "--set training.seed: error[S001] value" in r.output, r.output  # a comment: S001
    quoted = spec.replace(f"  seed: {text}\n", "  seed: 10\n")  # the number as YAML 1.2 reads it: no S010
    (tmp_path / "ok.yaml").write_text(quoted)
    assert "S010" not in CliRunner().invoke(app, ["plan", str(tmp_path / "ok.yaml")]).output
