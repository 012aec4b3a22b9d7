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

The site (the spec's ``cluster.kubernetes`` and ``cluster.env``, read from the lock's resolved spec): ``image``
replaces the placeholder; ``namespace`` is the TrainJob's; ``shm_gib`` mounts a memory-backed emptyDir of that
``sizeLimit`` at ``/dev/shm`` (a container's own is 64 MiB: NCCL's shared-memory transport and DataLoader workers need
more, NCCL "Troubleshooting", Docker/shared memory; https://kubernetes.io/docs/concepts/storage/volumes/#emptydir:
the tmpfs counts against the container's memory); ``rdma_resources`` join the GPUs in ``resourcesPerNode`` (limits
and requests alike, as Kubernetes requires of extended resources; the spec refuses the GPU's own resource there); ``node_selector``, ``tolerations``,
``service_account``, and the pods' ``labels`` / ``annotations`` go in the same ``runtimePatches`` (what the
v1alpha1 TrainJob of Kubeflow Trainer 2.3.0 may patch in a pod); ``priority_class`` and ``queue`` are Kueue's labels
on the TrainJob (``kueue.x-k8s.io/priority-class``, ``kueue.x-k8s.io/queue-name``: the API patches no pod
``priorityClassName``; https://kueue.sigs.k8s.io/docs/concepts/workload_priority_class/ and
https://kueue.sigs.k8s.io/docs/tasks/run/trainjobs/); ``cluster.env`` joins the trainer's ``env``, every ``$``
doubled as in ``command`` and ``args`` (:func:`k8s_literal`: the kubelet expands ``$(VAR)`` there). A spec that
targets Kubernetes (its ``cluster.kubernetes`` section) without ``shm_gib`` gets a build warning (X114): an 8-GPU pod's
NCCL would meet the container's 64 MiB. Every multi-node GPU build writes the manifest, with defaults where the spec
has no such section; it then says so in its own header (``/dev/shm`` is the container's), and the build does not warn:
a spec that never asked for Kubernetes is not told about a pod setting.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from llmc.diagnostics import Diagnostic
from llmc.emit.base import Emitter
from llmc.emit.common import diag
from llmc.emit.skypilot import (
    cluster_shape,
    dump_yaml,
    header,
    multi_node_gpu,
    site,
)
from llmc.lockfile import LOCK_FILE
from llmc.spec.schema import TRAINJOB_OWN_ENV

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
SHM_VOLUME = "llmc-shm"  # the pod's name for the memory-backed /dev/shm (cluster.kubernetes.shm_gib)
SHM_DIR = "/dev/shm"
# Kueue's labels on a job (https://kueue.sigs.k8s.io/docs/concepts/workload_priority_class/, .../tasks/run/trainjobs/)
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def k8s_literal(text: str) -> str:
    """``text`` as a container's ``command`` / ``args`` / ``env[].value`` must spell it for the container to get it
    as written: every ``$`` doubled. The kubelet expands ``$(VAR_NAME)`` in those fields from the container's earlier
    environment and reduces ``$$`` to ``$`` ("Double $$ are reduced to a single $, which allows for escaping the
    $(VAR_NAME) syntax", https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#environment-variables
    and ``command`` / ``args`` there; the grammar: kubernetes/kubernetes third_party/forked/golang/expansion/expand.go,
    where ``$$`` is read first, left to right), so ``$(LLMC_RUN_DIR)`` in ``cluster.env`` stays the literal text
    the shell launchers export, and the launcher script keeps its own ``$`` for bash."""
    return text.replace("$", "$$")


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


def kubernetes_site(lock: dict) -> dict:
    """The spec's ``cluster.kubernetes`` as the lock holds it (``{}`` when the spec sets none)."""
    return site(lock).get("kubernetes") or {}


def quantity_gib(gib: float) -> str:
    """A Kubernetes quantity for ``gib`` GiB: ``16Gi``, else whole MiB rounded up (``0.5`` -> ``512Mi``)."""
    return f"{int(gib)}Gi" if float(gib).is_integer() else f"{math.ceil(gib * 1024)}Mi"


def image(lock: dict) -> str:
    """The trainer image: the spec's ``cluster.kubernetes.image``, else the placeholder under registry.invalid."""
    shape = cluster_shape(lock)
    sha = (lock.get("_llmc") or {}).get("spec_sha256", "")
    return kubernetes_site(lock).get("image") or f"{IMAGE_REGISTRY}/llmc/{k8s_name(shape.name, 63)}:{sha[:12] or 'latest'}"


def trainjob(lock: dict) -> dict:
    """The TrainJob manifest as a dict."""
    shape = cluster_shape(lock)
    sha = (lock.get("_llmc") or {}).get("spec_sha256", "")
    k8s = kubernetes_site(lock)
    gpu = shape.k8s_resource
    n = str(shape.gpus_per_node)
    per_node = {gpu: n, **{name: str(count) for name, count in (k8s.get("rdma_resources") or {}).items()}}
    container: dict = {"name": RUNTIME_CONTAINER, "volumeMounts": [{"name": RUN_VOLUME, "mountPath": RUN_DIR}]}
    pod: dict = {
        "terminationGracePeriodSeconds": grace_seconds(lock),
        "volumes": [{"name": RUN_VOLUME, "persistentVolumeClaim": {"claimName": run_claim(lock)}}],
        "containers": [container],
    }
    if k8s.get("shm_gib"):
        pod["volumes"].append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory",
                                                                "sizeLimit": quantity_gib(k8s["shm_gib"])}})
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": SHM_DIR})
    if k8s.get("node_selector"):
        pod["nodeSelector"] = dict(k8s["node_selector"])
    if k8s.get("tolerations"):
        pod["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in k8s["tolerations"]]
    if k8s.get("service_account"):
        pod["serviceAccountName"] = k8s["service_account"]
    pod_template: dict = {"spec": pod}
    pod_meta = {k: dict(k8s[k]) for k in ("labels", "annotations") if k8s.get(k)}
    if pod_meta:
        pod_template = {"metadata": pod_meta, "spec": pod}
    labels = {"app.kubernetes.io/managed-by": "llmc"}
    if k8s.get("priority_class"):
        labels[KUEUE_PRIORITY_LABEL] = k8s["priority_class"]
    if k8s.get("queue"):
        labels[KUEUE_QUEUE_LABEL] = k8s["queue"]
    metadata: dict = {"name": k8s_name(shape.name)}
    if k8s.get("namespace"):
        metadata["namespace"] = k8s["namespace"]
    metadata.update({"labels": labels,
                     "annotations": {"llmc/spec-name": shape.name, "llmc/spec-sha256": sha}})
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "trainer": {
                "image": image(lock),
                # (the kubelet expands $(VAR) and halves $$ in command, args and env values: k8s_literal)
                "command": [k8s_literal(a) for a in ("bash", "-c")],
                "args": [k8s_literal(COMMAND % {"gpn": shape.gpus_per_node})],
                # llmc's own entries (the spec caps cluster.env at the CRD's maxItems less these), then the site's
                "env": [{"name": k, "value": k8s_literal(v)} for k, v in (
                    *zip(TRAINJOB_OWN_ENV, (BUILD_DIR, RUN_DIR, shape.name), strict=True),
                    *(site(lock).get("env") or {}).items(),
                )],
                "numNodes": shape.num_nodes,
                "numProcPerNode": shape.gpus_per_node,
                "resourcesPerNode": {"limits": dict(per_node), "requests": dict(per_node)},
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": RUNTIME_JOB,
                    "template": {"spec": {"template": pod_template}},
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
    k8s = kubernetes_site(lock)
    set_image = ("# is fine): trainer.image is the spec's cluster.kubernetes.image." if k8s.get("image") else
                 "# is fine); trainer.image must name it: set cluster.kubernetes.image in the spec (the placeholder's "
                 "registry.invalid never resolves, RFC 2606).")
    shm = (f"# /dev/shm: a {quantity_gib(k8s['shm_gib'])} memory-backed emptyDir (cluster.kubernetes.shm_gib; it "
           "counts against the pod's memory)." if k8s.get("shm_gib") else
           "# /dev/shm is the container's own (64 MiB unless the runtime mounts more), too small for NCCL's shared-"
           "memory transport: set cluster.kubernetes.shm_gib.")
    lines = header(lock) + [
        f"# Kubeflow Trainer TrainJob: {shape.num_nodes} node(s) x {shape.gpus_per_node} GPUs "
        f"({shape.world} in all), runtime {RUNTIME}.",
        f"# The image must contain llmc (with its runtime extras) and this build directory at {BUILD_DIR} (read-only",
        set_image,
        shm,
        f"# Everything the run writes goes to LLMC_RUN_DIR={RUN_DIR}, one storage for every pod: create the",
        f"# PersistentVolumeClaim {run_claim(lock)} with accessModes [ReadWriteMany] (NFS, CephFS, a cloud file",
        "# store), mounted there by the runtimePatches; then",
        "#   kubectl apply -f kubeflow/trainjob.yaml",
        f"# A stopped pod gets {grace_seconds(lock)} s between SIGTERM and SIGKILL (terminationGracePeriodSeconds, "
        "the plan's preemption figure): its trainers save the current step and exit.",
        "# Every $ in command, args and env values is written $$: Kubernetes expands $(VAR) there and reads $$ as",
        "# one $, so the container gets the script and the spec's cluster.env values exactly as written.",
    ]
    return {"kubeflow/trainjob.yaml": "\n".join(lines) + "\n" + dump_yaml(trainjob(lock))}


class KubeflowEmitter(Emitter):
    """``kubeflow/trainjob.yaml`` for a multi-node GPU build, from the lock the lock emitter wrote."""

    name = "kubeflow"

    def applies(self, compiled) -> bool:
        return multi_node_gpu(compiled)

    def diagnostics(self, compiled) -> list[Diagnostic]:
        """X114 for a spec that targets Kubernetes (``cluster.kubernetes``) without ``shm_gib``; none otherwise (the
        manifest's header says /dev/shm is the container's default)."""
        k8s = compiled.spec.cluster.kubernetes if compiled.spec.cluster is not None else None
        if k8s is None or k8s.shm_gib is not None:
            return []
        return [diag("X114", "warning", "cluster.kubernetes.shm_gib",
                     "kubeflow/trainjob.yaml mounts no /dev/shm: its pods keep the container's 64 MiB, which NCCL's "
                     "shared-memory transport outgrows (\"unhandled system error\", bus errors) unless the training "
                     "runtime mounts a larger one",
                     "set cluster.kubernetes.shm_gib (a memory-backed emptyDir at /dev/shm, e.g. 16; NCCL "
                     "Troubleshooting, Docker/shared memory)")]

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        return files(json.loads(earlier[LOCK_FILE]))
