"""The spec's ``cluster`` section (site options): the TrainJob checked against the Kubeflow Trainer 2.3.0 CRD schema,
the SkyPilot task loaded by SkyPilot 0.14.1 itself (``.venv-sky``), the launchers' environment run by bash, hostile
values escaped for YAML and the shell, and bad values refused with one located line each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cluster_manifests import TRAINJOB_CRD, _sky_python, closed

ROOT = Path(__file__).resolve().parents[1]

# what no escaping may let the shell run or expand, and what YAML must keep as it is
HOSTILE = "$(touch pwned) `touch pwned2` ${HOME} 'single' \"double\" \\ back\nsecond line; exit 3"

SPEC = """
name: site-run
model: llama3-8b
hardware: {gpu: h100-sxm, count: 16, gpus_per_node: 8}
data: {seq_len: 4096, tokens: 10B}
cluster:
  env:
    NCCL_IB_HCA: mlx5_0,mlx5_1
    NCCL_SOCKET_IFNAME: "=eth0"
    NCCL_IB_GID_INDEX: "3"
    FI_PROVIDER: efa
    NCCL_HOSTILE: HOSTILE_VALUE
  kubernetes:
    image: ghcr.io/acme/llmc-train:1.2.3
    namespace: ml-team
    shm_gib: 64
    rdma_resources: {rdma/rdma_shared_device_a: 1, nvidia.com/hostdev: 8}
    node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3, pool: "true"}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      - {key: spot, operator: Equal, value: "yes", effect: NoExecute, tolerationSeconds: 60}
      - {operator: Exists}
    priority_class: high-priority
    queue: team-queue
    service_account: trainer
    labels: {team: ml}
    annotations: {k8s.v1.cni.cncf.io/networks: "rdma-net-1, rdma-net-2", note: HOSTILE_VALUE}
  skypilot:
    network_tier: best
    use_spot: true
    cloud: aws
    region: us-east-1
    zone: us-east-1a
    image_id: ami-0123456789abcdef0
""".replace("HOSTILE_VALUE", json.dumps(HOSTILE))  # a JSON string is a YAML double-quoted scalar

ENV = {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "=eth0", "NCCL_IB_GID_INDEX": "3", "FI_PROVIDER": "efa",
       "NCCL_HOSTILE": HOSTILE}
LAUNCHERS = ["native/launch.sh", "launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh",
             "launch/slurm.sbatch", "torchtitan/run_single_node.sh", "torchtitan/run_multi_node.sh",
             "deepspeed/launch.sh"]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("site")
    spec = d / "spec.yaml"
    spec.write_text(SPEC)
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(spec), "-o", str(d / "build")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "X114" not in r.stdout + r.stderr  # shm_gib is set
    return d / "build"


def _pod(doc: dict) -> dict:
    (patch,) = doc["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]


def test_trainjob_holds_the_site_and_fits_the_crd(build):
    jsonschema = pytest.importorskip("jsonschema")
    text = (build / "kubeflow/trainjob.yaml").read_text()
    doc = yaml.safe_load(text)
    jsonschema.validate(doc, closed(json.loads(TRAINJOB_CRD.read_text())["openAPIV3Schema"]))
    spec = yaml.safe_load(SPEC)["cluster"]
    k8s = spec["kubernetes"]
    trainer = doc["spec"]["trainer"]
    assert trainer["image"] == k8s["image"] and "registry.invalid" not in text
    assert doc["metadata"]["namespace"] == "ml-team"
    for side in ("limits", "requests"):
        assert trainer["resourcesPerNode"][side] == {"nvidia.com/gpu": "8", "nvidia.com/hostdev": "8",
                                                     "rdma/rdma_shared_device_a": "1"}
    from test_input_hygiene import pod_env

    env = pod_env(trainer)  # the container's values, after the kubelet's $(VAR) expansion
    assert {k: env[k] for k in ENV} == ENV  # the hostile value round-trips through YAML and the kubelet
    assert env["LLMC_RUN_DIR"] == "/workspace/run"
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high-priority"
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    pod = _pod(doc)
    assert pod["metadata"] == {"labels": {"team": "ml"}, "annotations": k8s["annotations"]}
    ps = pod["spec"]
    (shm,) = [v for v in ps["volumes"] if "emptyDir" in v]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    (container,) = ps["containers"]
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert ps["nodeSelector"] == k8s["node_selector"]
    assert ps["tolerations"] == k8s["tolerations"]
    assert ps["serviceAccountName"] == "trainer"
    # the Kubernetes quantity a reader parses: 64 GiB
    assert re.fullmatch(r"(\d+)Gi", shm["emptyDir"]["sizeLimit"])[1] == "64"


def test_trainjob_without_site_is_as_before_and_warns(tmp_path):
    from test_cluster_manifests import _artifacts

    files, warnings = _artifacts("plain", "h100-sxm")
    doc = yaml.safe_load(files["kubeflow/trainjob.yaml"])
    assert doc["spec"]["trainer"]["image"].startswith("registry.invalid/")
    assert not any("emptyDir" in v for v in _pod(doc)["spec"]["volumes"])
    # /dev/shm is the container's 64 MiB: said in the manifest; X114 only for a spec that targets Kubernetes
    assert "X114" not in warnings
    assert "# /dev/shm is the container's own (64 MiB" in files["kubeflow/trainjob.yaml"]
    # a single-node build writes no TrainJob and so does not warn
    from llmc.compiler.compile import compile_spec
    from llmc.emit import build_warnings
    from llmc.spec.load import loads_spec

    text = "name: one\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 4096, tokens: 10B}\n"
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
    assert "X114" not in {d.code for d in build_warnings(c)}


SKY_SITE = """
import json, sys, yaml, sky
task = sky.Task.from_yaml_config(yaml.safe_load(open(sys.argv[1])), env_overrides=[
    ("LLMC_PACKAGE", "git+https://example.invalid/llmc.git"), ("LLMC_RUN_DIR", "/shared/run")])
res = list(task.resources)[0]
print(json.dumps({"network_tier": res.network_tier.value if res.network_tier else None, "use_spot": res.use_spot,
                  "cloud": str(res.cloud), "region": res.region, "zone": res.zone, "image_id": res.image_id,
                  "envs": task.envs}))
"""


def test_skypilot_task_site_loads_in_skypilot(build):
    py = _sky_python()
    if py is None:
        pytest.skip("skypilot is not installed here (scripts/setup.sh puts it in .venv-sky)")
    out = subprocess.run([py, "-c", SKY_SITE, str(build / "skypilot/task.yaml")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["network_tier"] == "best" and got["use_spot"] is True
    assert (got["cloud"], got["region"], got["zone"]) == ("AWS", "us-east-1", "us-east-1a")
    assert got["image_id"] == {"us-east-1": "ami-0123456789abcdef0"}
    assert {k: got["envs"][k] for k in ENV} == ENV


def test_every_launcher_exports_the_site_env_literally(build, tmp_path):
    """Each launcher's site-environment lines, run by bash, give exactly the spec's values (nothing expanded or run);
    a value already in the environment wins; every script still parses."""
    for rel in LAUNCHERS:
        text = (build / rel).read_text()
        r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert r.returncode == 0, (rel, r.stderr)
        lines = [ln for ln in text.splitlines() if re.match(r"\[\[ -v [A-Z_][A-Z0-9_]* \]\] \|\| export ", ln)]
        # a value holding a newline goes on past its line inside its quotes: the block ends at the first line end
        # after the last assignment where bash parses it whole
        start = text.index(lines[0])
        end = text.index(lines[-1]) + len(lines[-1])
        while subprocess.run(["bash", "-n"], input=text[start:end], text=True, capture_output=True).returncode:
            end = text.index("\n", end + 1)
        block = text[start:end]
        probe = block + '\nfor v in ' + " ".join(ENV) + '; do printf "%s\\0" "${!v}"; done\n'
        env = {k: v for k, v in os.environ.items() if k not in ENV}
        r = subprocess.run(["bash", "-c", probe], capture_output=True, cwd=tmp_path, env=env)
        assert r.returncode == 0, (rel, r.stderr)
        assert r.stdout.decode().split("\0")[:-1] == list(ENV.values()), rel
        assert not list(tmp_path.iterdir()), rel  # $(touch ...) never ran
        r = subprocess.run(["bash", "-c", probe], capture_output=True, cwd=tmp_path,
                           env={**env, "NCCL_IB_HCA": "from-env"})
        assert r.stdout.decode().split("\0")[0] == "from-env", rel
    # torchtitan's Slurm script runs torchtitan/run_multi_node.sh on every node, which exports it
    assert '"$HERE/run_multi_node.sh"' in (build / "torchtitan/slurm.sbatch").read_text()
    # DeepSpeed's remote ranks (pdsh / ssh) see only what its environment file passes: the site's names are in it
    # (the variables DeepSpeed's runner forwards by itself are NCCL*, PYTHON*, ...: not FI_* or UCX_*)
    ds = (build / "deepspeed/launch.sh").read_text()
    passed = re.search(r'case "\$v" in ([^)]*)\)', ds).group(1).split("|")
    assert all(name in passed for name in ENV), passed


def test_launchers_unchanged_without_site(tmp_path):
    from test_cluster_manifests import _artifacts

    files, _ = _artifacts("plain", "h100-sxm")
    for rel in LAUNCHERS:
        assert "[[ -v " not in files[rel] and "cluster.env" not in files[rel], rel


def test_reserved_names_cover_what_the_launchers_set():
    """Every variable a launch template assigns or exports is refused as a cluster.env name (read from the
    templates, not from the schema's list)."""
    from llmc.spec.schema import env_name

    names = set()
    for p in (ROOT / "llmc/templates").rglob("*.j2"):
        for m in re.finditer(r"(?:^|[\s;(]|export |local )([A-Z_][A-Z0-9_]*)=", p.read_text(), re.M):
            names.add(m[1])
    for name in ("LLMC_BUILD_DIR", "PET_NNODES", "SKYPILOT_NUM_NODES", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        names.add(name)  # the manifests' and torchrun's
    assert len(names) > 30
    for name in sorted(names):
        with pytest.raises(ValueError, match="set by llmc"):
            env_name(name)
    for ok in ("NCCL_IB_HCA", "FI_EFA_USE_DEVICE_RDMA", "UCX_TLS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "_X"):
        assert env_name(ok) == ok


BASE = "name: bad\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 16, gpus_per_node: 8}\n" \
       "data: {seq_len: 4096, tokens: 10B}\ncluster:\n"
BAD = [
    ("  env: {MASTER_ADDR: x}\n", 6, "cluster.env.MASTER_ADDR: ", "set by llmc"),
    ("  env: {LLMC_RUN_DIR: /x}\n", 6, "cluster.env.LLMC_RUN_DIR: ", "set by llmc"),
    ("  env: {nccl_debug: INFO}\n", 6, "cluster.env.nccl_debug: ", "upper-case"),
    ("  env: {9NCCL: INFO}\n", 6, "cluster.env.9NCCL: ", "upper-case"),
    ("  kubernetes:\n    node_selector: {\"-bad/key\": v}\n", 7, "cluster.kubernetes.node_selector.-bad/key: the key must", "qualified"),
    ("  kubernetes:\n    labels: {\"a b\": v}\n", 7, "cluster.kubernetes.labels.a b: the key must", "qualified"),
    ("  kubernetes:\n    tolerations:\n      - {key: a, operator: Maybe}\n", 8,
     "cluster.kubernetes.tolerations.0.operator", "Exists"),
    ("  kubernetes:\n    tolerations:\n      - {key: a, value: \"x\\\"y\\nz\"}\n", 8,
     "cluster.kubernetes.tolerations.0.value", "label value"),
    ("  kubernetes:\n    tolerations:\n      - {key: a, operator: Exists, value: b}\n", 8,
     "cluster.kubernetes.tolerations.0", "no value"),
    ("  kubernetes:\n    shm_gib: -1\n", 7, "cluster.kubernetes.shm_gib", "> 0"),
    ("  kubernetes:\n    rdma_resources: {rdma_device: 1}\n", 7, "cluster.kubernetes.rdma_resources.rdma_device: the key must", "domain/name"),
    ("  kubernetes:\n    rdma_resources: {rdma/hca: 0}\n", 7, "cluster.kubernetes.rdma_resources.rdma/hca: must", "> 0"),
    ("  kubernetes:\n    namespace: Team_A\n", 7, "cluster.kubernetes.namespace", "RFC 1123"),
    ("  kubernetes:\n    image: \"img:tag; rm -rf /\"\n", 7, "cluster.kubernetes.image", "image reference"),
    ("  skypilot:\n    network_tier: fastest\n", 7, "cluster.skypilot.network_tier", "best"),
    ("  skypilot:\n    cloud: aws\n    zone: us-east-1a\n", 8, "cluster.skypilot.zone", "needs a region"),
]


@pytest.mark.parametrize("body,line,path,words", BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_site_values_one_located_line(tmp_path, body, line, path, words):
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + body)
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "plan", str(spec)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    errs = [ln for ln in out.splitlines() if "error[" in ln]
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"{spec}:{line}: error[S002] {path}") and words in errs[0], errs[0]
