"""SkyPilot task for a build: ``files(lock) -> {"skypilot/task.yaml": text}``.

Input is the ``plan.lock.json`` dict as ``llmc build`` writes it (nothing else is read), so this emitter
does not depend on compiler internals. The task runs the build's own multi-node launcher
(``launch/torchrun_multi_node.sh``) on every node, mapping SkyPilot's per-node environment onto it:
``NNODES=$SKYPILOT_NUM_NODES``, ``NPROC=$SKYPILOT_NUM_GPUS_PER_NODE``,
``MASTER_ADDR`` = the first line of ``$SKYPILOT_NODE_IPS`` (the head node), torchrun rendezvous c10d on
``MASTER_ADDR:MASTER_PORT``. Reference: SkyPilot "Distributed Multi-Node Jobs" and "YAML spec",
https://docs.skypilot.co/en/latest/running-jobs/distributed-jobs.html and
https://docs.skypilot.co/en/latest/reference/yaml-spec.html

Usage (from the build directory, which becomes the task's ``workdir`` and is synced to every node's own disk: the
run only reads it)::

    sky launch -c <cluster> skypilot/task.yaml --env LLMC_PACKAGE=<pip requirement for llmc> \
        --env LLMC_RUN_DIR=<a folder on storage every node mounts>

Both are required (``envs`` null: SkyPilot refuses the task until ``--env`` gives them). ``LLMC_PACKAGE`` has no
default: the ``llmc`` project on PyPI is another one, so a bare requirement would install a stranger's package; give
a git URL or a wheel, and setup checks that it installed llmc's runtime. ``LLMC_RUN_DIR`` is where the run writes
everything (prepare's output, checkpoints, metrics, exports), and every node must see it as one storage (the launcher
checks that at start-up): a network file system or a SkyPilot ``volumes`` entry of a ReadWriteMany volume.

The site (the spec's ``cluster.skypilot``, read from the lock's resolved spec) goes under ``resources``:
``network_tier`` (``best``: the cloud's high-performance interconnect, InfiniBand / GPUDirect-TCPX / EFA, where
SkyPilot supports one), ``use_spot``, ``image_id``, and ``cloud`` / ``region`` / ``zone`` as one
``infra: cloud/region/zone`` (SkyPilot 0.14.1's form: its separate ``cloud`` / ``region`` / ``zone`` are deprecated;
``*`` for a region without a cloud). The spec's ``cluster.env`` joins the task's ``envs``.

The task's ``name`` is the spec name as SkyPilot's rule takes it (:func:`sky_name`). ``RUN_ID`` (the launcher's
rendezvous id) is not in ``envs``: ``run`` sets it to SkyPilot's ``SKYPILOT_TASK_ID`` of the launch unless
``--env RUN_ID=...`` gives one. A ``cluster.kubernetes`` / ``cluster.skypilot`` section on a build that writes no
cluster manifest (one node, or the CPU) gets warning X117 (:func:`unused_site`).

Shared helpers used by :mod:`llmc.emit.kubeflow` too: :class:`ClusterShape`, :func:`cluster_shape`
(nodes x GPUs per node and the accelerator, from the lock), :func:`site`, :func:`header` and :func:`dump_yaml`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from llmc.diagnostics import Diagnostic
from llmc.emit.base import Emitter
from llmc.emit.common import diag, gpus_per_node, header_text, is_cpu, nnodes
from llmc.escape import comment
from llmc.lockfile import LOCK_FILE
from llmc.spec.schema import K8S_GPU_RESOURCE

# K8S_GPU_RESOURCE: the Kubernetes extended resource per GPU vendor (NVIDIA / AMD device plugins), the spec's table
# (it refuses them as cluster.kubernetes.rdma_resources); the vendor and the SkyPilot accelerator name are hardware
# data (llmc.compiler.hardware.GPU.vendor / .skypilot_name, in the lock).


@dataclass(frozen=True)
class ClusterShape:
    name: str  # the spec's name
    hardware_key: str  # llmc hardware key, e.g. "h100-sxm"
    world: int  # GPUs in the job
    gpus_per_node: int
    num_nodes: int
    k8s_resource: str = K8S_GPU_RESOURCE["nvidia"]  # the Kubernetes device-plugin resource of the GPU
    accelerator: str | None = None  # SkyPilot accelerator name (None: none known)


def cluster_shape(lock: dict) -> ClusterShape:
    """Nodes x GPUs per node of the build, as the lock's ``cluster`` records them (the numbers the
    build's launchers use). Raises ValueError for the CPU pseudo-device (nothing to schedule)."""
    hw = lock["hardware"]
    key = hw["key"]
    if key == "cpu":
        raise ValueError("the build targets the local CPU pseudo-device; cluster manifests need GPUs")
    c = lock["cluster"]  # written once, by llmc.emit.lock.lock_dict
    return ClusterShape(lock["spec"]["name"], key, int(c["world"]), int(c["gpus_per_node"]), int(c["nnodes"]),
                        K8S_GPU_RESOURCE[hw["vendor"]], hw["skypilot_name"])


def site(lock: dict) -> dict:
    """The spec's ``cluster`` section as the lock's resolved spec holds it (``{}`` when the spec has none)."""
    return ((lock.get("spec") or {}).get("resolved") or {}).get("cluster") or {}


def infra(sky: dict) -> str | None:
    """SkyPilot's ``infra`` string from ``cluster.skypilot``'s cloud / region / zone: ``cloud[/region[/zone]]``,
    ``*`` for a region without a cloud (sky/utils/infra_utils.py ``InfraInfo.from_str``); None for none."""
    parts = [sky.get("cloud"), sky.get("region"), sky.get("zone")]
    while parts and parts[-1] is None:
        parts.pop()
    return "/".join(p if p is not None else "*" for p in parts) or None


def header(lock: dict) -> list[str]:
    """The generated-file comment lines every build artifact starts with (``common.header_text`` of the lock's
    header, as YAML comments that cannot end early: ``escape.comment``)."""
    return [comment(line, "yaml") for line in header_text(lock.get("_llmc") or {})]


class _Dumper(yaml.SafeDumper):
    pass


# A string stays plain only when every YAML reader takes it as a string: PyYAML (YAML 1.1) and Kubernetes'
# go-yaml read ``1e3`` as a number and ``y`` / ``on`` as booleans where PyYAML's dumper leaves them unquoted.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_YAML11_WORDS = frozenset({"y", "yes", "n", "no", "true", "false", "on", "off", "null"})


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    if "\n" in s:
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    plain = _PLAIN.fullmatch(s) is not None and s.lower() not in _YAML11_WORDS
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=None if plain else '"')


_Dumper.add_representer(str, _str)


def dump_yaml(doc: dict) -> str:
    """Deterministic block YAML (insertion order kept; multi-line strings as ``|`` literals)."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


SETUP = """set -euo pipefail
if [ -z "${LLMC_PACKAGE:-}" ]; then
  echo "error: LLMC_PACKAGE is empty: give llmc's pip requirement with --env LLMC_PACKAGE=... (a git URL or a wheel; PyPI's llmc is another project)" >&2
  exit 2
fi
python -m pip install --upgrade pip
python -m pip install "$LLMC_PACKAGE"
if ! python -c "import llmc.runtime" 2>/dev/null; then
  echo "error: LLMC_PACKAGE=$LLMC_PACKAGE installed no llmc runtime (python -c 'import llmc.runtime' fails); give llmc's own git URL or wheel, with its runtime extras" >&2
  exit 2
fi
"""

RUN = """set -euo pipefail
if [ -z "${LLMC_RUN_DIR:-}" ]; then
  echo "error: LLMC_RUN_DIR is empty: mount storage every node shares and give its path with --env LLMC_RUN_DIR=..." >&2
  exit 2
fi
export NNODES="$SKYPILOT_NUM_NODES" NPROC="$SKYPILOT_NUM_GPUS_PER_NODE"
export MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"
# the rendezvous id: `--env RUN_ID=...` if given, else SkyPilot's id of this launch (always set)
export RUN_ID="${RUN_ID:-${SKYPILOT_TASK_ID:-}}"
bash launch/torchrun_multi_node.sh
"""


# SkyPilot 0.14.1's task name rule (sky/task.py ``_VALID_NAME_REGEX``, checked by ``Task.validate_name`` when
# `sky launch` validates the task): alphanumeric runs joined by one or two of '.', '_', '-'
_SKY_SEPARATORS = re.compile(r"[._-]{3,}")


def sky_name(name: str) -> str:
    """The SkyPilot task name of a spec name (``[A-Za-z0-9][A-Za-z0-9._-]*``, :data:`llmc.spec.schema.NAME_PATTERN`):
    each run of three or more separators cut to its first two and the separators at either end dropped
    (``qwen___run`` -> ``qwen__run``, ``qwen-run-`` -> ``qwen-run``); any other character (none in a spec name) as
    ``-``. A name SkyPilot takes is kept as it is."""
    s = _SKY_SEPARATORS.sub(lambda m: m[0][:2], re.sub(r"[^A-Za-z0-9._-]", "-", name)).strip("._-")
    return s or "llmc"


def _version(lock: dict) -> str:
    """The llmc version that wrote the lock (what ``LLMC_PACKAGE`` should install)."""
    return str((lock.get("_llmc") or {}).get("llmc_version") or lock.get("llmc_version") or "")


def task(lock: dict) -> dict:
    """The SkyPilot task as a dict (what ``sky.Task.from_yaml_config`` takes)."""
    shape = cluster_shape(lock)
    accel = shape.accelerator
    if accel is None:
        raise ValueError(f"hardware {shape.hardware_key!r} has no SkyPilot accelerator name")
    sky = site(lock).get("skypilot") or {}
    resources: dict = {"accelerators": f"{accel}:{shape.gpus_per_node}"}
    if infra(sky) is not None:
        resources["infra"] = infra(sky)
    for key in ("network_tier", "use_spot", "image_id"):
        if sky.get(key) is not None:
            resources[key] = sky[key]
    return {
        "name": sky_name(shape.name),
        "num_nodes": shape.num_nodes,
        "resources": resources,
        "workdir": ".",
        "envs": {
            # required (null: `sky launch` refuses the task until --env gives it): llmc's pip requirement, with the
            # runtime extras of this build's version (a git URL or a wheel: PyPI's "llmc" is another project)
            "LLMC_PACKAGE": None,
            # required: where the run writes, on storage every node mounts (the launcher checks it is shared)
            "LLMC_RUN_DIR": None,
            "MASTER_PORT": "29500",
            # (no RUN_ID: a value here would hide SkyPilot's task id from `run`, which uses it unless --env gives one)
            **(site(lock).get("env") or {}),  # the site's (cluster.env), exported by the launcher too
        },
        "setup": SETUP,
        "run": RUN,
    }


class SkyPilotEmitter(Emitter):
    """``skypilot/task.yaml`` for a multi-node GPU build, from the lock the lock emitter wrote."""

    name = "skypilot"

    def applies(self, compiled) -> bool:
        return multi_node_gpu(compiled)

    def diagnostics(self, compiled) -> list[Diagnostic]:
        if compiled.gpu.skypilot_name is not None:
            return []
        return [diag("X111", "warning", "hardware.gpu",
                     f"no SkyPilot accelerator name is known for {compiled.gpu.key!r}: skypilot/task.yaml is not "
                     "written (the other launchers are)",
                     "set hardware.gpu_overrides.skypilot_name (`sky show-gpus -a`, or your node pool's label)")]

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        if compiled.gpu.skypilot_name is None:
            return {}
        return files(json.loads(earlier[LOCK_FILE]))


def multi_node_gpu(compiled) -> bool:
    """Cluster manifests are emitted only for GPU builds spanning more than one node."""
    return not is_cpu(compiled) and nnodes(compiled) > 1


# The manifest each cluster section configures
SITE_FILES = {"kubernetes": "kubeflow/trainjob.yaml", "skypilot": "skypilot/task.yaml"}


def unused_site(compiled) -> list[Diagnostic]:
    """X117 for each ``cluster.kubernetes`` / ``cluster.skypilot`` section of a build that writes no cluster manifest
    (:func:`multi_node_gpu`: a CPU build, or one node's GPUs), whose settings would otherwise go unused unsaid."""
    cluster = compiled.spec.cluster
    if cluster is None or multi_node_gpu(compiled):
        return []
    if is_cpu(compiled):
        why, hint = "the build targets the CPU", "cluster manifests schedule GPUs: set hardware.gpu to a GPU"
    else:
        why = f"the build runs on one node ({gpus_per_node(compiled)} GPUs)"
        hint = ("run `llmc launch` or launch/torchrun_single_node.sh on the node, or set hardware.count above "
                "hardware.gpus_per_node for a multi-node job")
    return [diag("X117", "warning", f"cluster.{section}",
                 f"this section is set, but {why}: no {rel} is written (cluster manifests are for multi-node GPU "
                 "builds), so its settings are unused", f"{hint}, or remove the section")
            for section, rel in SITE_FILES.items() if getattr(cluster, section) is not None]


def files(lock: dict) -> dict[str, str]:
    """``{"skypilot/task.yaml": text}`` for a GPU build; ValueError for a CPU-only one."""
    shape = cluster_shape(lock)
    lines = header(lock) + [
        f"# SkyPilot task: {shape.num_nodes} node(s) x {shape.gpus_per_node} GPUs ({shape.world} in all).",
        "# From the build directory (synced to each node's disk, only read):",
        "#   sky launch -c <cluster> skypilot/task.yaml --env LLMC_PACKAGE=<llmc, e.g. a git URL or wheel> \\",
        "#     --env LLMC_RUN_DIR=<mount path>",
        f"# LLMC_PACKAGE: llmc {_version(lock)} with its runtime,torchtitan extras; no default, as PyPI's `llmc` is",
        "# another project. Every node runs launch/torchrun_multi_node.sh, which writes everything (prepare's output,",
        "# checkpoints, metrics) under LLMC_RUN_DIR: mount storage every node shares there (a network file system,",
        "# or a SkyPilot `volumes` entry of a ReadWriteMany volume; a bucket mount, MOUNT or MOUNT_CACHED, lacks the",
        "# atomic mkdir the launcher's claims rely on); the nodes check at start that they see one storage.",
        "# RUN_ID (the rendezvous id) is SkyPilot's task id of the launch (SKYPILOT_TASK_ID) unless --env RUN_ID=...",
        "# gives one.",
    ]
    return {"skypilot/task.yaml": "\n".join(lines) + "\n" + dump_yaml(task(lock))}
