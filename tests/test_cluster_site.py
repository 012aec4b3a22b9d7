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
from test_cluster_manifests import SKY_VALIDATE, TRAINJOB_CRD, _sky_python, closed

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
    assert "X117" not in r.stdout + r.stderr  # two nodes: both manifests are written, the sections are used
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
""" + SKY_VALIDATE + """
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
                         timeout=300, cwd=build)
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


# ---------------------------------------------------------------------------------------------------------------
# limits the API server, the Kubeflow Trainer CRD and the kubelet's image parser hold a TrainJob to, kept in the spec


def _refused(body: str) -> list[str]:
    """The error lines the loader gives ``BASE + body`` (a spec with a two-node GPU cluster), none if it takes it."""
    from llmc.diagnostics import SpecError
    from llmc.spec.load import loads_spec

    try:
        loads_spec(BASE + body, file="spec.yaml")
    except SpecError as e:
        return [d.render() for d in e.diagnostics if d.severity == "error"]
    return []


def _site_trainjob(cluster: str) -> dict:
    """The TrainJob of ``BASE`` + ``cluster`` (the lines under ``cluster:``), rendered."""
    from llmc.compiler.compile import compile_spec
    from llmc.emit import render_artifacts
    from llmc.spec.load import loads_spec

    text = BASE + cluster
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
    return yaml.safe_load(render_artifacts(c)["kubeflow/trainjob.yaml"])


def _crd() -> dict:
    return json.loads(TRAINJOB_CRD.read_text())["openAPIV3Schema"]


def test_rdma_resources_may_not_replace_the_gpus():
    """``resourcesPerNode`` holds the GPU's resource with the plan's GPUs per node (numProcPerNode the same): an
    ``rdma_resources`` key equal to it would replace that count. The GPU resource is read from the manifests of an
    NVIDIA and an AMD build; each is refused with one located line, and an RDMA device is still taken."""
    from test_cluster_manifests import _artifacts

    for gpu in ("h100-sxm", "mi300x"):
        files, _ = _artifacts("multi", gpu)
        (resource,) = yaml.safe_load(files["kubeflow/trainjob.yaml"])["spec"]["trainer"]["resourcesPerNode"]["limits"]
        errs = _refused(f"  kubernetes:\n    rdma_resources: {{{resource}: 1}}\n")
        assert len(errs) == 1, errs
        assert errs[0].startswith(f"spec.yaml:7: error[S002] cluster.kubernetes.rdma_resources.{resource}: "), errs
        assert "GPU" in errs[0] and "RDMA" in errs[0], errs
    assert _refused("  kubernetes:\n    rdma_resources: {rdma/hca: 2, nvidia.com/hostdev: 8}\n") == []


def test_env_and_image_stop_at_the_crds_limits():
    """The API server refuses a TrainJob past its CRD's ``spec.trainer.env`` maxItems or ``spec.trainer.image``
    maxLength (read here from the published CRD): a spec at the limits gives a TrainJob the CRD takes, one past
    them is refused by the loader with one located line."""
    jsonschema = pytest.importorskip("jsonschema")
    trainer = _crd()["properties"]["spec"]["properties"]["trainer"]["properties"]
    max_env, max_image = trainer["env"]["maxItems"], trainer["image"]["maxLength"]
    from test_cluster_manifests import _artifacts

    own = len(yaml.safe_load(_artifacts("plain", "h100-sxm")[0]["kubeflow/trainjob.yaml"])["spec"]["trainer"]["env"])
    site_env = max_env - own  # what cluster.env may hold
    # the longest reference the parser takes: a 255-character name, a tag and a sha512 digest (128 hex digits)
    name = "ghcr.io/" + "a" * (255 - len("ghcr.io/"))
    tag_len = max_image - len(name) - 1 - len("@sha512:") - 128
    assert 1 <= tag_len <= 128
    image = f"{name}:{'t' * tag_len}@sha512:{'0' * 128}"
    assert len(image) == max_image

    def env(n: int) -> str:
        return "  env: {" + ", ".join(f"NCCL_X{i}: v" for i in range(n)) + "}\n"

    doc = _site_trainjob(env(site_env) + f"  kubernetes:\n    image: {image}\n    shm_gib: 1\n")
    assert len(doc["spec"]["trainer"]["env"]) == max_env and doc["spec"]["trainer"]["image"] == image
    jsonschema.validate(doc, closed(_crd()))
    errs = _refused(env(site_env + 1))
    assert len(errs) == 1 and errs[0].startswith("spec.yaml:6: error[S002] cluster.env: ") \
        and f"at most {site_env}" in errs[0], errs
    longer = image.replace("@", "t@")
    errs = _refused(f"  kubernetes:\n    image: {longer}\n")
    assert len(errs) == 1 and errs[0].startswith("spec.yaml:7: error[S002] cluster.kubernetes.image: ") \
        and str(max_image) in errs[0], errs


def test_tolerations_stop_at_the_crds_limit():
    pod = _crd()["properties"]["spec"]["properties"]["runtimePatches"]["items"]["properties"]["trainingRuntimeSpec"]
    for key in ("template", "spec", "replicatedJobs", "items", "template", "spec", "template", "spec"):
        pod = pod["items"] if key == "items" else pod["properties"][key]
    most = pod["properties"]["tolerations"]["maxItems"]

    def tolerations(n: int) -> str:
        return "  kubernetes:\n    tolerations:\n" + "".join(f"      - {{key: t{i}, operator: Exists}}\n"
                                                            for i in range(n))
    assert _refused(tolerations(most)) == []
    errs = _refused(tolerations(most + 1))
    assert len(errs) == 1 and "cluster.kubernetes.tolerations" in errs[0] and str(most) in errs[0], errs


def test_pod_annotations_stop_at_the_api_servers_total():
    """k8s.io/apimachinery ValidateAnnotations: the keys' and values' lengths in bytes (Go's len of a string) may sum
    to at most TotalAnnotationSizeLimitB = 256 * 1024."""
    limit = 256 * 1024
    big = "\U0001F600" * 32768  # 4 bytes each in UTF-8: 131072 bytes in 32768 characters

    def annotations(values: dict[str, str]) -> str:
        return "  kubernetes:\n    annotations: " + json.dumps(values, ensure_ascii=False) + "\n"

    fits = {"a": big, "bb": big[:-1] + "x"}  # 1 + 131072 + 2 + 131069 bytes
    assert sum(len(k.encode()) + len(v.encode()) for k, v in fits.items()) == limit
    assert _refused(annotations(fits)) == []
    over = {"a": big, "bbb": fits["bb"]}
    errs = _refused(annotations(over))
    assert len(errs) == 1 and errs[0].startswith("spec.yaml:7: error[S002] cluster.kubernetes.annotations: ") \
        and str(limit) in errs[0], errs


# distribution/reference's grammar (ASCII classes; name at most NameTotalLengthMax = 255) and go-digest's digests
# (sha256 / sha384 / sha512 in lower-case hex of 64 / 96 / 128 digits; other algorithms unsupported), which the
# kubelet's runtime parses an image with
GOOD_IMAGES = ["ghcr.io/a/b:v1", "localhost:5000/a/b_c__d---e", "a/b@sha256:" + "0f" * 32,
               "ghcr.io/a/b:" + "w" * 128 + "@sha384:" + "a" * 96, "a@sha512:" + "9" * 128,
               "r.io/" + "a" * 250]
BAD_IMAGES = ["ghcr.io/a/b:v\u00e91", "ghcr.io/a/b:\u0661\u0662", "ghcr.io/\u00e9/b", "ghcr.io/a/b@sha256:" + "a" * 32,
              "ghcr.io/a/b@sha256:" + "a" * 63, "ghcr.io/a/b@sha256:" + "A" * 64, "ghcr.io/a/b@md5:" + "a" * 32,
              "ghcr.io/a/b@sha512:" + "a" * 64, "r.io/" + "a" * 251, "ghcr.io/a/b:" + "w" * 129]


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_image_references_the_kubelet_takes(image):
    from llmc.spec.schema import image_reference

    assert image_reference(image) == image


@pytest.mark.parametrize("image", BAD_IMAGES, ids=range(len(BAD_IMAGES)))
def test_image_references_the_kubelet_refuses(image):
    errs = _refused(f"  kubernetes:\n    image: {json.dumps(image)}\n")
    assert len(errs) == 1 and errs[0].startswith("spec.yaml:7: error[S002] cluster.kubernetes.image: "), errs


UNUSED_SITE = "  kubernetes: {shm_gib: 16}\n  skypilot: {use_spot: true}\n"


def _build_warnings(spec: str) -> list:
    from llmc.compiler.compile import compile_spec
    from llmc.emit import build_warnings, render_artifacts
    from llmc.spec.load import loads_spec

    run, lines = loads_spec(spec, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=spec.encode())
    files = render_artifacts(c)
    assert "kubeflow/trainjob.yaml" not in files and "skypilot/task.yaml" not in files
    return [d for d in build_warnings(c) if d.code == "X117"]


def test_cluster_sections_of_a_build_without_manifests_warn():
    """A build on one node, or on the CPU, writes no TrainJob and no SkyPilot task: a spec's cluster.kubernetes /
    cluster.skypilot section there would be ignored without a word. Each gets warning X117 naming it and why."""
    one_node = BASE.replace("count: 16, gpus_per_node: 8", "count: 8, gpus_per_node: 8") + UNUSED_SITE
    warned = _build_warnings(one_node)
    assert [(d.path, d.severity) for d in warned] == [("cluster.kubernetes", "warning"),
                                                       ("cluster.skypilot", "warning")], warned
    assert all("one node" in d.message and "llmc launch" in d.hint for d in warned)
    assert "kubeflow/trainjob.yaml" in warned[0].message and "skypilot/task.yaml" in warned[1].message
    cpu = ("name: bad\nmodel: tiny\nhardware: {gpu: cpu, count: 1}\n"
           "data: {seq_len: 64, tokens: 20480, sources: [{name: python-docs, format: builtin}], "
           "tokenizer: {train: true, vocab_size: 512}}\ntraining: {global_batch_tokens: 2048}\ncluster:\n"
           "  kubernetes: {shm_gib: 16}\n")
    (warned,) = _build_warnings(cpu)
    assert warned.path == "cluster.kubernetes" and "CPU" in warned.message
    # a single-node spec without those sections (cluster.env only: every launcher uses it) does not warn
    assert _build_warnings(one_node.replace(UNUSED_SITE, "  env: {NCCL_DEBUG: INFO}\n")) == []
