"""Kubeflow Trainer v2 TrainJob for a build: ``files(lock) -> {"kubeflow/trainjob.yaml": text}``.

Input is the ``plan.lock.json`` dict as ``llmc build`` writes it. The manifest is a ``TrainJob``
(``apiVersion: trainer.kubeflow.org/v1alpha1``) that references the ``torch-distributed``
ClusterTrainingRuntime and sets ``trainer.numNodes``, ``numProcPerNode`` and ``resourcesPerNode``
(``nvidia.com/gpu``, or ``amd.com/gpu`` for AMD parts). Reference: Kubeflow Trainer API,
https://www.kubeflow.org/docs/components/trainer/ and the TrainJob CRD in
https://github.com/kubeflow/trainer (``manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml``).

Every training pod runs the build's own ``launch/torchrun_multi_node.sh``; the torch plugin of Kubeflow
Trainer gives each node ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``
and ``PET_MASTER_PORT`` (torchrun's ``PET_*`` environment options), which the command maps onto the
launcher's ``NNODES``, ``NPROC``, ``MASTER_ADDR``, ``MASTER_PORT``.

The container image must hold llmc (with its runtime extras) and the build directory at
``/workspace/build`` (read-only is fine: the run writes nothing there). ``trainer.image`` is a placeholder,
``registry.invalid/llmc/<spec name>:<first 12 hex of the spec sha256>``: ``.invalid`` is a top-level domain reserved
never to resolve (RFC 2606, section 2), so an image nobody built is never pulled from a namespace llmc does not own
(a bare ``llmc/<name>`` is Docker Hub's ``llmc`` namespace); set it to the image you build and push.

Everything the run writes (prepare's tokenizer and data, checkpoints, metrics, exports) goes under
``LLMC_RUN_DIR=/workspace/run``, which every pod must see as one storage (the launcher checks it at start-up and
stops with one line if not): the manifest's ``runtimePatches`` mount there, in the runtime's trainer container, the
PersistentVolumeClaim ``<job name>-run``, which the user creates with access mode ``ReadWriteMany`` (a volume many
nodes mount read-write: NFS, CephFS, a cloud file store;
https://kubernetes.io/docs/concepts/storage/persistent-volumes/#access-modes).

Stopping a pod (preemption, eviction, a node drain, ``kubectl delete``): the kubelet sends SIGTERM to the
container's first process and SIGKILL ``terminationGracePeriodSeconds`` later (30 s by default;
https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination). That first process is the
command's shell, PID 1 of the pod's PID namespace, which the kernel gives no signal it has no handler for
(pid_namespaces(7): "the only signals that can be sent to the init process are those for which the init process has
established a signal handler"): a plain ``bash -c`` would let the SIGTERM vanish and the trainers die in the
SIGKILL with every step since the last interval checkpoint. So the command starts the launcher in a process group
of its own, passes a SIGTERM on to that group (torchrun forwards it to the trainers, which save the current step
and exit; the launcher's shell ignores it and ends with their preempted status) and ends only once that group has
(torchrun among it, which waits for its trainers: they run in sessions of their own), and the manifest's ``runtimePatches`` set the pods'
``terminationGracePeriodSeconds`` to the plan's figure (the lock's ``preemption.signal_lead_seconds``: torchrun's
shutdown time + the relay's, as Slurm's ``--signal`` lead).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from llmc.emit.base import Emitter
from llmc.emit.skypilot import (
    cluster_shape,
    dump_yaml,
    header,
    multi_node_gpu,
)
from llmc.lockfile import LOCK_FILE

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "torch-distributed"
BUILD_DIR = "/workspace/build"
RUN_DIR = "/workspace/run"  # LLMC_RUN_DIR: the claim's mount
RUN_VOLUME = "llmc-run"  # the pod's name for that volume
IMAGE_REGISTRY = "registry.invalid"  # RFC 2606: never resolves (the image is the user's to name)

COMMAND = """set -euo pipefail
export NNODES="${PET_NNODES:-1}" NPROC="${PET_NPROC_PER_NODE:-%(gpn)d}"
export MASTER_ADDR="${PET_MASTER_ADDR:-localhost}" MASTER_PORT="${PET_MASTER_PORT:-29500}"
# PID 1: a SIGTERM reaches this shell only through its trap (set first: one before it would be lost), which passes it
# on to the launcher's process group (torchrun, which forwards it to its trainers); the launcher's own shell ignores
# it and ends with their status
group= stop=
trap 'stop=1; [ -z "$group" ] || kill -TERM -- "-$group" 2>/dev/null || true' TERM
setsid bash -c 'trap "" TERM; exec bash "$0"' "$LLMC_BUILD_DIR/launch/torchrun_multi_node.sh" &
group=$!
[ -z "$stop" ] || kill -TERM -- "-$group" 2>/dev/null || true
wait "$group" || true  # returns early when the trap ran
while kill -0 -- "-$group" 2>/dev/null; do sleep 1; done  # torchrun may outlive the script (it waits for its trainers)
wait "$group"  # the launcher's exit status
"""
# The training runtime's replicated job and its trainer container (manifests/base/runtimes/torch_distributed.yaml in
# kubeflow/trainer: replicatedJobs[name=node], containers[name=node]) and the owner of the patch below
# (spec.runtimePatches[].manager: any name; Kueue uses its own)
RUNTIME_JOB = "node"
RUNTIME_CONTAINER = "node"
PATCH_MANAGER = "llmc"


def k8s_name(name: str, limit: int = 40) -> str:
    """A DNS-1035 label from the spec name (lower-case letters, digits and '-', starts with a letter);
    kept short because the controller derives pod and service names from it."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "llmc-" + s
    return s[:limit].rstrip("-")


def run_claim(lock: dict) -> str:
    """The name of the PersistentVolumeClaim mounted as ``LLMC_RUN_DIR``: the job's name + ``-run``."""
    return k8s_name(cluster_shape(lock).name) + "-run"


def trainjob(lock: dict) -> dict:
    """The TrainJob manifest as a dict."""
    shape = cluster_shape(lock)
    sha = (lock.get("_llmc") or {}).get("spec_sha256", "")
    gpu = shape.k8s_resource
    n = str(shape.gpus_per_node)
    pod = {
        "terminationGracePeriodSeconds": grace_seconds(lock),
        "volumes": [{"name": RUN_VOLUME, "persistentVolumeClaim": {"claimName": run_claim(lock)}}],
        "containers": [{"name": RUNTIME_CONTAINER, "volumeMounts": [{"name": RUN_VOLUME, "mountPath": RUN_DIR}]}],
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {
            "name": k8s_name(shape.name),
            "labels": {"app.kubernetes.io/managed-by": "llmc"},
            "annotations": {"llmc/spec-name": shape.name, "llmc/spec-sha256": sha},
        },
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "trainer": {
                "image": f"{IMAGE_REGISTRY}/llmc/{k8s_name(shape.name, 63)}:{sha[:12] or 'latest'}",
                "command": ["bash", "-c"],
                "args": [COMMAND % {"gpn": shape.gpus_per_node}],
                "env": [
                    {"name": "LLMC_BUILD_DIR", "value": BUILD_DIR},
                    {"name": "LLMC_RUN_DIR", "value": RUN_DIR},
                    {"name": "RUN_ID", "value": shape.name},
                ],
                "numNodes": shape.num_nodes,
                "numProcPerNode": shape.gpus_per_node,
                "resourcesPerNode": {"limits": {gpu: n}, "requests": {gpu: n}},
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": RUNTIME_JOB,
                    "template": {"spec": {"template": {"spec": pod}}},
                }]}}},
            }],
        },
    }


def grace_seconds(lock: dict) -> int:
    """The pods' ``terminationGracePeriodSeconds``: the plan's shutdown time after a SIGTERM plus the relay's (the
    lock's ``preemption.signal_lead_seconds``, written by ``llmc.compiler.checkpoint_cost.preemption_numbers``; with
    no saves known, its floor, as the launchers' ``llmc.emit.common.preemption_context``)."""
    from llmc.compiler.checkpoint_cost import preemption_numbers

    p = lock.get("preemption")
    return int(p["signal_lead_seconds"]) if p else preemption_numbers([]).signal_lead_seconds


def files(lock: dict) -> dict[str, str]:
    """``{"kubeflow/trainjob.yaml": text}`` for a GPU build; ValueError for a CPU-only one."""
    shape = cluster_shape(lock)
    lines = header(lock) + [
        f"# Kubeflow Trainer TrainJob: {shape.num_nodes} node(s) x {shape.gpus_per_node} GPUs "
        f"({shape.world} in all), runtime {RUNTIME}.",
        f"# The image must contain llmc (with its runtime extras) and this build directory at {BUILD_DIR} (read-only",
        "# is fine); set trainer.image to it (the placeholder's registry.invalid never resolves, RFC 2606).",
        f"# Everything the run writes goes to LLMC_RUN_DIR={RUN_DIR}, one storage for every pod: create the",
        f"# PersistentVolumeClaim {run_claim(lock)} with accessModes [ReadWriteMany] (NFS, CephFS, a cloud file",
        "# store), mounted there by the runtimePatches; then",
        "#   kubectl apply -f kubeflow/trainjob.yaml",
        f"# A stopped pod gets {grace_seconds(lock)} s between SIGTERM and SIGKILL (terminationGracePeriodSeconds, "
        "the plan's preemption figure): its trainers save the current step and exit.",
    ]
    return {"kubeflow/trainjob.yaml": "\n".join(lines) + "\n" + dump_yaml(trainjob(lock))}


class KubeflowEmitter(Emitter):
    """``kubeflow/trainjob.yaml`` for a multi-node GPU build, from the lock the lock emitter wrote."""

    name = "kubeflow"

    def applies(self, compiled) -> bool:
        return multi_node_gpu(compiled)

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        return files(json.loads(earlier[LOCK_FILE]))
