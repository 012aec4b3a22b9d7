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
``/workspace/build``; ``trainer.image`` names it ``llmc/<spec name>:<first 12 hex of the spec sha256>``,
a tag to build and push (or edit) before ``kubectl apply -f kubeflow/trainjob.yaml``.
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

COMMAND = """set -euo pipefail
export NNODES="${PET_NNODES:-1}" NPROC="${PET_NPROC_PER_NODE:-%(gpn)d}"
export MASTER_ADDR="${PET_MASTER_ADDR:-localhost}" MASTER_PORT="${PET_MASTER_PORT:-29500}"
bash "$LLMC_BUILD_DIR/launch/torchrun_multi_node.sh"
"""


def k8s_name(name: str, limit: int = 40) -> str:
    """A DNS-1035 label from the spec name (lower-case letters, digits and '-', starts with a letter);
    kept short because the controller derives pod and service names from it."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "llmc-" + s
    return s[:limit].rstrip("-")


def trainjob(lock: dict) -> dict:
    """The TrainJob manifest as a dict."""
    shape = cluster_shape(lock)
    sha = (lock.get("_llmc") or {}).get("spec_sha256", "")
    gpu = shape.k8s_resource
    n = str(shape.gpus_per_node)
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
                "image": f"llmc/{k8s_name(shape.name, 63)}:{sha[:12] or 'latest'}",
                "command": ["bash", "-c"],
                "args": [COMMAND % {"gpn": shape.gpus_per_node}],
                "env": [
                    {"name": "LLMC_BUILD_DIR", "value": BUILD_DIR},
                    {"name": "RUN_ID", "value": shape.name},
                ],
                "numNodes": shape.num_nodes,
                "numProcPerNode": shape.gpus_per_node,
                "resourcesPerNode": {"limits": {gpu: n}, "requests": {gpu: n}},
            },
        },
    }


def files(lock: dict) -> dict[str, str]:
    """``{"kubeflow/trainjob.yaml": text}`` for a GPU build; ValueError for a CPU-only one."""
    shape = cluster_shape(lock)
    lines = header(lock) + [
        f"# Kubeflow Trainer TrainJob: {shape.num_nodes} node(s) x {shape.gpus_per_node} GPUs "
        f"({shape.world} in all), runtime {RUNTIME}.",
        f"# The image must contain llmc and this build directory at {BUILD_DIR}; then",
        "#   kubectl apply -f kubeflow/trainjob.yaml",
        "# RUN_DIR (checkpoints, metrics) should be a volume shared by the nodes for resume.",
    ]
    return {"kubeflow/trainjob.yaml": "\n".join(lines) + "\n" + dump_yaml(trainjob(lock))}


class KubeflowEmitter(Emitter):
    """``kubeflow/trainjob.yaml`` for a multi-node GPU build, from the lock the lock emitter wrote."""

    name = "kubeflow"

    def applies(self, compiled) -> bool:
        return multi_node_gpu(compiled)

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        return files(json.loads(earlier[LOCK_FILE]))
