"""Cluster manifests from built locks: SkyPilot task YAML (validated against SkyPilot's own JSON schemas,
and by SkyPilot's own ``sky.Task.from_yaml_config``, run in the separate ``.venv-sky`` environment that
``scripts/setup.sh`` makes, because skypilot 0.14.1 and this environment disagree on click) and Kubeflow Trainer v2 TrainJob
(validated by the ``kubeflow-trainer-api`` models), for the multi-node examples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmc.emit import kubeflow, skypilot

ROOT = Path(__file__).resolve().parents[1]
SKY_SCHEMAS = ROOT / "tests/fixtures/cluster/skypilot-0.14.1-schemas.json"
TRAINJOB_CRD = ROOT / "tests/fixtures/cluster/kubeflow-trainer-2.3.0-trainjob-v1alpha1.json"
EXAMPLES = ["llama3_70b_h100x64", "llama3_405b_h100x16384", "deepseek_v3", "mixtral_8x7b"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for ex in EXAMPLES:
        d = tmp_path_factory.mktemp(ex)
        subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(ROOT / f"examples/{ex}.yaml"), "-o", str(d)],
                       check=True, cwd=ROOT, capture_output=True)
        out[ex] = d
    return out


def expected_shape(ex: str, build: Path) -> tuple[int, int]:
    """(nodes, GPUs per node) from the spec YAML and the build's Slurm script, independently of the emitter."""
    hw = yaml.safe_load((ROOT / f"examples/{ex}.yaml").read_text())["hardware"]
    sbatch = (build / "launch/slurm.sbatch").read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", sbatch).group(1))
    gpn = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", sbatch).group(1))
    assert nodes * gpn == int(hw["count"])
    return nodes, gpn


@pytest.mark.parametrize("ex", EXAMPLES)
def test_skypilot_task_valid_and_matches_build(ex, builds):
    jsonschema = pytest.importorskip("jsonschema")
    lock = json.loads((builds[ex] / "plan.lock.json").read_text())
    files = skypilot.files(lock)
    assert list(files) == ["skypilot/task.yaml"]
    text = files["skypilot/task.yaml"]
    assert text.startswith("# llmc ") and lock["_llmc"]["spec_sha256"] in text
    doc = yaml.safe_load(text)
    schemas = json.loads(SKY_SCHEMAS.read_text())
    jsonschema.validate(doc, schemas["task"])
    jsonschema.validate(doc["resources"], schemas["resources"])

    nodes, gpn = expected_shape(ex, builds[ex])
    assert doc["num_nodes"] == nodes
    name, count = doc["resources"]["accelerators"].split(":")
    assert int(count) == gpn
    assert name == {"h100-sxm": "H100", "h800": "H800"}[lock["hardware"]["key"]]
    run = doc["run"]
    for var in ("SKYPILOT_NUM_NODES", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE"):
        assert f"${var}" in run
    assert "launch/torchrun_multi_node.sh" in run and (builds[ex] / "launch/torchrun_multi_node.sh").exists()
    # the launcher reads exactly the variables the task sets
    launcher = (builds[ex] / "launch/torchrun_multi_node.sh").read_text()
    for var in ("NNODES", "NPROC", "MASTER_ADDR", "MASTER_PORT", "RUN_ID"):
        assert f"${{{var}" in launcher and (f"{var}=" in run or var in doc["envs"])
    assert skypilot.files(lock) == files  # deterministic
    assert (builds[ex] / "skypilot/task.yaml").read_text() == text  # `llmc build` emits it (SkyPilotEmitter)


def _sky_python() -> str | None:
    """The interpreter that has skypilot: this one if it imports ``sky``, else ``.venv-sky`` (scripts/setup.sh)."""
    try:
        import sky  # noqa: F401

        return sys.executable
    except ImportError:
        p = ROOT / ".venv-sky/bin/python"
        return str(p) if (ROOT / ".venv-sky/.installed").exists() else None  # scripts/setup.sh marks it complete


# What `sky launch` checks of a task before it runs it (sky.Task.validate, called by its entrypoint), less the
# resources' part, which fetches SkyPilot's catalog from the network: the name (``_VALID_NAME_REGEX``), the run
# script, the workdir (run from the build directory, as `sky launch` is) and the file mounts
SKY_VALIDATE = """
task.validate_name()
task.validate_run()
task.expand_and_validate_workdir()
task.expand_and_validate_file_mounts()
"""

SKY_LOAD = """
import json, sys, yaml, sky
# the two values the task requires from `sky launch --env` (llmc's package, the shared run folder)
task = sky.Task.from_yaml_config(yaml.safe_load(open(sys.argv[1])), env_overrides=[
    ("LLMC_PACKAGE", "git+https://example.invalid/llmc.git"), ("LLMC_RUN_DIR", "/shared/run")])
""" + SKY_VALIDATE + """
res = list(task.resources)[0]
print(json.dumps({"num_nodes": task.num_nodes, "accelerators": res.accelerators, "run": task.run}))
"""


@pytest.mark.parametrize("ex", EXAMPLES)
def test_skypilot_task_loads_in_skypilot(ex, builds):
    py = _sky_python()
    if py is None:
        pytest.skip("skypilot is not installed here (scripts/setup.sh puts it in .venv-sky)")
    lock = json.loads((builds[ex] / "plan.lock.json").read_text())
    task_yaml = builds[ex] / "skypilot/task.yaml"
    out = subprocess.run([py, "-c", SKY_LOAD, str(task_yaml)], capture_output=True, text=True, timeout=300,
                         cwd=builds[ex])
    assert out.returncode == 0, out.stderr[-2000:]
    task = json.loads(out.stdout.strip().splitlines()[-1])
    nodes, gpn = expected_shape(ex, builds[ex])
    assert task["num_nodes"] == nodes
    assert task["accelerators"] == {{"h100-sxm": "H100", "h800": "H800"}[lock["hardware"]["key"]]: gpn}
    assert "launch/torchrun_multi_node.sh" in task["run"] and (builds[ex] / "launch/torchrun_multi_node.sh").exists()


@pytest.mark.parametrize("ex", EXAMPLES)
def test_kubeflow_trainjob_valid_and_matches_build(ex, builds):
    api = pytest.importorskip("kubeflow_trainer_api.models")
    lock = json.loads((builds[ex] / "plan.lock.json").read_text())
    files = kubeflow.files(lock)
    assert list(files) == ["kubeflow/trainjob.yaml"]
    assert (builds[ex] / "kubeflow/trainjob.yaml").read_text() == files["kubeflow/trainjob.yaml"]
    doc = yaml.safe_load(files["kubeflow/trainjob.yaml"])
    job = api.TrainerV1alpha1TrainJob.from_dict(doc)
    # the generated models drop unknown fields: a lossless round trip means every field is part of the API
    assert job.to_dict() == doc
    assert job.api_version == "trainer.kubeflow.org/v1alpha1" and job.kind == "TrainJob"
    assert job.spec.runtime_ref.name == "torch-distributed"
    nodes, gpn = expected_shape(ex, builds[ex])
    assert job.spec.trainer.num_nodes == nodes
    assert job.spec.trainer.num_proc_per_node == gpn
    assert doc["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": str(gpn)}
    name = job.metadata.name
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40  # DNS-1035 label
    cmd = job.spec.trainer.args[0]
    for var in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
        assert f"${{{var}" in cmd
    assert "launch/torchrun_multi_node.sh" in cmd


MULTI_NODE = """
name: "{name}"
model: llama3-8b
hardware: {{gpu: {gpu}, count: 16, gpus_per_node: 8{extra}}}
data: {{seq_len: 4096, tokens: 10B}}
"""


def _artifacts(name: str, gpu: str, extra: str = ""):
    from llmc.compiler.compile import compile_spec
    from llmc.emit import build_warnings, render_artifacts
    from llmc.spec.load import loads_spec

    text = MULTI_NODE.format(name=name, gpu=gpu, extra=extra)
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
    return render_artifacts(c), {d.code for d in build_warnings(c)}


# SkyPilot's names for the table's parts (sky show-gpus -a / sky/utils/gpu_names.py; RunPod's H100-NVL, RTX4090),
# written out here independently of the hardware table; None: SkyPilot knows no name for the part
SKY_NAMES = {"h100-sxm": "H100", "h100-pcie": "H100", "h800": "H800", "h200": "H200", "b200": "B200", "b300": "B300",
             "gb200": "GB200", "gb300": "GB300", "h100-nvl": "H100-NVL", "h100-hbm2e-96g": None, "h20": None,
             "a100-40g": "A100", "a100-80g": "A100-80GB", "l40s": "L40S", "mi300x": "MI300X", "mi325x": None,
             "rtx4090": "RTX4090"}
AMD = {"mi300x", "mi325x"}


def test_every_table_gpu_builds_multi_node_manifests():
    """Every GPU of the table builds on two nodes: the SkyPilot task names SkyPilot's accelerator (or, where SkyPilot
    has none, is left out with warning X111), and the TrainJob asks for the vendor's device-plugin resource."""
    from llmc.compiler.hardware import GPUS

    assert set(SKY_NAMES) == set(GPUS) - {"cpu"}
    for gpu, sky_name in SKY_NAMES.items():
        files, warnings = _artifacts("multi", gpu)
        job = yaml.safe_load(files["kubeflow/trainjob.yaml"])
        resource = "amd.com/gpu" if gpu in AMD else "nvidia.com/gpu"
        assert job["spec"]["trainer"]["resourcesPerNode"]["limits"] == {resource: "8"}, gpu
        if sky_name is None:
            assert "skypilot/task.yaml" not in files and "X111" in warnings, gpu
        else:
            task = yaml.safe_load(files["skypilot/task.yaml"])
            assert task["resources"]["accelerators"] == f"{sky_name}:8" and "X111" not in warnings, gpu
    # a custom part takes its base's names, or its own
    files, _ = _artifacts("multi", "my-gpu", ", gpu_overrides: {base: mi300x}")
    assert "amd.com/gpu" in files["kubeflow/trainjob.yaml"] and '"MI300X:8"' in files["skypilot/task.yaml"]
    files, warnings = _artifacts("multi", "my-gpu", ", gpu_overrides: {bf16_tflops: 500, hbm_gib: 64, hbm_tbps: 2}")
    assert "skypilot/task.yaml" not in files and "X111" in warnings
    files, _ = _artifacts("multi", "h20", ", gpu_overrides: {skypilot_name: H20-POOL, vendor: nvidia}")
    assert yaml.safe_load(files["skypilot/task.yaml"])["resources"]["accelerators"] == "H20-POOL:8"


# What a YAML 1.2 core-schema reader (Kubernetes' go-yaml / sigs.k8s.io/yaml) or a YAML 1.1 one resolves to something
# other than a string when written plain (https://yaml.org/spec/1.2.2/#1032-tag-resolution, https://yaml.org/type/bool.html)
NOT_STRINGS = re.compile(r"""(?x)
    ~|null|Null|NULL|
    [yY]|yes|Yes|YES|[nN]|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF|
    [-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+|
    [-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?|
    [-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)|[0-9]+(:[0-5]?[0-9])+""")


@pytest.mark.parametrize("name", ["y", "N", "on", "1e3", "1.5e3", "0x1f", "007", "null", "true", "ok-name"])
def test_cluster_yaml_writes_no_string_a_yaml_reader_takes_for_a_number_or_bool(name):
    """The spec name lands in the manifests as labels, env values and the task name: a plain ``y`` or ``1e3`` there
    is a bool or a float to kubectl. Every plain scalar the manifests write must be one no reader resolves."""
    files, _ = _artifacts(name, "h100-sxm")
    for rel in ("kubeflow/trainjob.yaml", "skypilot/task.yaml"):
        text = files[rel]
        node = yaml.compose(text)
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, yaml.MappingNode):
                stack += [x for kv in n.value for x in kv]
            elif isinstance(n, yaml.SequenceNode):
                stack += n.value
            elif n.tag.endswith(":str") and n.style is None:
                assert not NOT_STRINGS.fullmatch(n.value), (rel, n.value)
        doc = yaml.safe_load(text)
        assert name in (doc.get("name"), doc.get("metadata", {}).get("annotations", {}).get("llmc/spec-name"))


def closed(schema):
    """A Kubernetes structural schema rejects unknown fields (kubectl's default strict field validation):
    objects with ``properties`` and no ``additionalProperties`` / preserve-unknown become closed."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.mark.parametrize("ex", EXAMPLES)
def test_kubeflow_trainjob_against_published_crd_schema(ex, builds):
    jsonschema = pytest.importorskip("jsonschema")
    schema = closed(json.loads(TRAINJOB_CRD.read_text())["openAPIV3Schema"])
    lock = json.loads((builds[ex] / "plan.lock.json").read_text())
    doc = yaml.safe_load(kubeflow.files(lock)["kubeflow/trainjob.yaml"])
    jsonschema.validate(doc, schema)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["trainer"]["gpus"] = 8  # the schema must be able to fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cpu_build_and_names(tmp_path):
    subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(ROOT / "examples/tiny_cpu.yaml"), "-o",
                    str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    assert not (tmp_path / "skypilot").exists() and not (tmp_path / "kubeflow").exists()
    lock = json.loads((tmp_path / "plan.lock.json").read_text())
    for mod in (skypilot, kubeflow):
        with pytest.raises(ValueError, match="CPU"):
            mod.files(lock)
    assert kubeflow.k8s_name("llama3.1-405b-h100x16384") == "llama3-1-405b-h100x16384"
    assert kubeflow.k8s_name("7B_Model") == "llmc-7b-model"


# A stand-in for the build's launcher: a bash script (no trap, as launch/torchrun_multi_node.sh) whose foreground
# child, as torchrun, takes a SIGTERM, spends SAVE_S "saving" and exits 75 (llmc's preempted status)
FAKE_TORCHRUN = """import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(1.5)
    (out / "saved").write_text("saved")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
(out / "started").write_text("started")
time.sleep(60)
"""


def _pod_pid1(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """The host pid of the first process in the PID namespace ``unshare --fork`` made (the unshare's child)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        if kids.exists() and kids.read_text().split():
            return int(kids.read_text().split()[0])
        time.sleep(0.05)
    raise AssertionError("no process in the new PID namespace")


def test_kubeflow_pod_passes_sigterm_to_the_trainers_and_waits_for_their_save(tmp_path):
    """Kubernetes stops a pod with SIGTERM to the container's first process, PID 1 of its PID namespace, which the
    kernel gives no signal it has no handler for (pid_namespaces(7)), then SIGKILL after the grace period. Run the
    TrainJob's command as PID 1 of a new PID namespace (as the container runtime does), SIGTERM it from outside:
    the launcher's trainer must get the signal, finish its save, and the pod's shell must outlive that save. The
    manifest's grace period must be the plan's (the lock's preemption figure), not Kubernetes' 30 s default."""
    import os
    import shutil
    import signal
    import time

    if not sys.platform.startswith("linux") or shutil.which("unshare") is None or shutil.which("setsid") is None:
        pytest.skip("needs Linux unshare(1) and setsid(1)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.decode()[-200:]}")
    files, _ = _artifacts("pod", "h100-sxm")
    doc = yaml.safe_load(files["kubeflow/trainjob.yaml"])
    (patch,) = doc["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"  # the torch-distributed runtime's replicated job
    grace = job["template"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    from llmc.compiler.checkpoint_cost import PREEMPT_FLOOR_S

    # at least torchrun's shutdown time (TORCH_ELASTIC_SHUTDOWN_TIMEOUT in the build's launcher) plus a relay
    shutdown = int(re.search(r'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)', files["launch/torchrun_multi_node.sh"]).group(1))
    assert grace > shutdown >= PREEMPT_FLOOR_S

    launch = tmp_path / "build/launch"
    launch.mkdir(parents=True)
    (tmp_path / "torchrun.py").write_text(FAKE_TORCHRUN)
    (launch / "torchrun_multi_node.sh").write_text(
        f'set -euo pipefail\n"{sys.executable}" "{tmp_path}/torchrun.py" "{tmp_path}"\n')
    env = {**os.environ, "LLMC_BUILD_DIR": str(tmp_path / "build")}
    from test_input_hygiene import kubelet_expand, pod_env

    trainer = doc["spec"]["trainer"]
    script = kubelet_expand(trainer["args"][0], pod_env(trainer))  # what the kubelet hands bash ($$ -> $)
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pid1 = _pod_pid1(proc)
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.05)
        os.kill(pid1, signal.SIGTERM)  # the kubelet's stop
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the pod's first process ignored the SIGTERM: the kubelet would SIGKILL the unsaved trainers")
        assert (tmp_path / "saved").exists(), "the pod ended before its trainer's save"
        assert proc.returncode == 75, proc.stdout.read().decode()[-2000:]  # the launcher's status: its trainer's
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Spec names llmc takes (letters, digits, '.', '_', '-', not starting with a symbol) that SkyPilot's task name rule
# (sky/task.py _VALID_NAME_REGEX: no separator at either end, at most two in a row) does not, and ones it does
SKY_NAMES_TO_CHECK = ["qwen-run-", "qwen___run", "a.-_b", "x--y---z__", "r.", "ok.name", "7B_Model", "a__b--c"]

SKY_NAMES_LOAD = """
import json, sys, yaml, sky
out = {}
for path in sys.argv[1:]:
    task = sky.Task.from_yaml_config(yaml.safe_load(open(path)), env_overrides=[
        ("LLMC_PACKAGE", "git+https://example.invalid/llmc.git"), ("LLMC_RUN_DIR", "/shared/run")])
    try:
""" + "".join(f"        {line}\n" for line in SKY_VALIDATE.strip().splitlines()) + """
        out[path] = task.name
    except ValueError as e:
        out[path] = "refused: " + str(e)
print(json.dumps(out))
"""


def test_skypilot_task_name_is_one_skypilot_takes(tmp_path):
    """`sky launch` validates the task's name (``Task.validate_name``): a spec name ending in '-' or holding three
    separators in a row would stop it. Every task llmc writes loads and validates in SkyPilot itself, its name the
    spec name's alphanumeric runs in order (recognisable), the same name each build (deterministic)."""
    py = _sky_python()
    if py is None:
        pytest.skip("skypilot is not installed here (scripts/setup.sh puts it in .venv-sky)")
    paths = {}
    for i, name in enumerate(SKY_NAMES_TO_CHECK):
        files, _ = _artifacts(name, "h100-sxm")
        assert _artifacts(name, "h100-sxm")[0]["skypilot/task.yaml"] == files["skypilot/task.yaml"]
        (tmp_path / f"{i}.yaml").write_text(files["skypilot/task.yaml"])
        paths[str(tmp_path / f"{i}.yaml")] = name
    out = subprocess.run([py, "-c", SKY_NAMES_LOAD, *paths], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for path, spec_name in paths.items():
        assert not got[path].startswith("refused"), (spec_name, got[path])
        assert re.findall(r"[A-Za-z0-9]+", got[path]) == re.findall(r"[A-Za-z0-9]+", spec_name), (spec_name, got[path])
    # a name SkyPilot takes is kept as it is
    assert {got[p] for p, n in paths.items() if n in ("ok.name", "7B_Model", "a__b--c")} == {"ok.name", "7B_Model",
                                                                                           "a__b--c"}


def _run_task(doc: dict, tmp_path: Path, **given: str) -> str:
    """``RUN_ID`` as the task's ``run`` exports it to the launcher, run by bash as SkyPilot runs it on a node: the
    task's ``envs`` with the ``--env`` values ``given`` over them, and SkyPilot's own variables (its task id among
    them; sky/skylet/constants.py TASK_ID_ENV_VAR), the launcher a stub that prints what it gets."""
    (tmp_path / "launch").mkdir(exist_ok=True)
    (tmp_path / "launch/torchrun_multi_node.sh").write_text('printf "%s" "$RUN_ID"\n')
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SKYPILOT_NUM_NODES": "2",
           "SKYPILOT_NUM_GPUS_PER_NODE": "8", "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2",
           "SKYPILOT_TASK_ID": "sky-2025-01-01-00-00-00-000000_mycluster_1",
           **{k: str(v) for k, v in doc["envs"].items() if v is not None},
           "LLMC_PACKAGE": "x", "LLMC_RUN_DIR": str(tmp_path / "run"), **given}
    r = subprocess.run(["bash", "-c", doc["run"]], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_skypilot_run_id_is_the_users_else_the_task_id(tmp_path):
    """The launcher documents RUN_ID (its rendezvous id) as a setting: `sky launch --env RUN_ID=...` must reach it;
    without one, each launch's own SkyPilot task id (always set) is used, not a fixed name from the task's envs."""
    files, _ = _artifacts("runid", "h100-sxm")
    doc = yaml.safe_load(files["skypilot/task.yaml"])
    assert _run_task(doc, tmp_path) == "sky-2025-01-01-00-00-00-000000_mycluster_1"
    assert _run_task(doc, tmp_path, RUN_ID="my-run-7") == "my-run-7"
    assert "RUN_ID" not in doc["envs"]
