"""The pods KubeRay builds from a RayService's pod templates, as far as pod security, volumes and
service-account tokens go: what the API server admits is the pod, not the template.

Follows KubeRay v1.7.0 `ray-operator/controllers/ray/common/pod.go`, which builds these the same
way as v1.3.0, the oldest release k8s/README.md requires:
- `DefaultHeadPodTemplate`: with in-tree autoscaling, an `autoscaler` container (the Ray
  container's image; `autoscalerOptions` replace its resources and securityContext, append its
  env and volumeMounts), which calls the Kubernetes API with the pod's service-account token;
- `DefaultWorkerPodTemplate`: a `wait-gcs-ready` init container after the template's own, with a
  copy of the Ray container's securityContext, env and volumeMounts and fixed cpu/memory;
- `BuildPod`: a memory emptyDir at /dev/shm unless one is mounted there; with the autoscaler, the
  `ray-logs` emptyDir (no sizeLimit) at /tmp/ray in both head containers, unless mounted there,
  reusing a pod volume of that name if the template has one.

Not covered: the rest of the pods (probes, commands, ports, the environment KubeRay sets), and
what KubeRay adds only on request (TLS init containers, history-server collectors, `/dev/shm`
skipped for a `plasma-directory`), none of which the manifests ask for.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.k8s.kustomize import Manifest

AUTOSCALER = "autoscaler"
WAIT_GCS_READY = "wait-gcs-ready"
RAY_LOGS_VOLUME, RAY_LOGS_PATH = "ray-logs", "/tmp/ray"
SHM_VOLUME, SHM_PATH = "shared-mem", "/dev/shm"
# KubeRay's defaults for the autoscaler container and the wait-gcs-ready init container.
_AUTOSCALER_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "512Mi"},
    "limits": {"cpu": "500m", "memory": "512Mi"},
}
_WAIT_GCS_READY_RESOURCES = {
    "requests": {"cpu": "200m", "memory": "256Mi"},
    "limits": {"cpu": "200m", "memory": "256Mi"},
}

Pod = dict[str, Any]


def autoscaling(rayservice: Manifest) -> bool:
    """Whether KubeRay runs the Ray autoscaler beside the head (enableInTreeAutoscaling)."""
    return bool(rayservice["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling"))


def _add_empty_dir(pod: Pod, container: dict[str, Any], name: str, path: str, medium: str) -> None:
    mounts = container.setdefault("volumeMounts", [])
    if any(mount["mountPath"] == path for mount in mounts):
        return
    volumes = pod["spec"].setdefault("volumes", [])
    if not any(volume["name"] == name for volume in volumes):
        volumes.append({"name": name, "emptyDir": {"medium": medium} if medium else {}})
    mounts.append({"name": name, "mountPath": path})


def head_pod(rayservice: Manifest) -> Pod:
    """The head pod: its template, plus the autoscaler sidecar and volumes KubeRay adds."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    pod = copy.deepcopy(cluster["headGroupSpec"]["template"])
    spec = pod["spec"]
    ray = spec["containers"][0]
    if autoscaling(rayservice):
        options = copy.deepcopy(cluster.get("autoscalerOptions") or {})
        sidecar: dict[str, Any] = {
            "name": AUTOSCALER,
            "image": options.get("image", ray["image"]),
            "resources": options.get("resources", copy.deepcopy(_AUTOSCALER_RESOURCES)),
            "env": options.get("env", []),
            "volumeMounts": options.get("volumeMounts", []),
        }
        if "securityContext" in options:
            sidecar["securityContext"] = options["securityContext"]
        spec["containers"].append(sidecar)
    _add_empty_dir(pod, ray, SHM_VOLUME, SHM_PATH, "Memory")
    if autoscaling(rayservice):
        _add_empty_dir(pod, ray, RAY_LOGS_VOLUME, RAY_LOGS_PATH, "")
        _add_empty_dir(pod, spec["containers"][-1], RAY_LOGS_VOLUME, RAY_LOGS_PATH, "")
    return pod


def worker_pod(group: dict[str, Any]) -> Pod:
    """A worker pod of a group: its template, plus KubeRay's wait-gcs-ready init container."""
    pod = copy.deepcopy(group["template"])
    spec = pod["spec"]
    ray = spec["containers"][0]
    wait: dict[str, Any] = {
        "name": WAIT_GCS_READY,
        "image": ray["image"],
        "env": copy.deepcopy(ray.get("env", [])),
        "volumeMounts": copy.deepcopy(ray.get("volumeMounts", [])),
        "resources": copy.deepcopy(_WAIT_GCS_READY_RESOURCES),
    }
    if "securityContext" in ray:
        wait["securityContext"] = copy.deepcopy(ray["securityContext"])
    spec.setdefault("initContainers", []).append(wait)
    _add_empty_dir(pod, ray, SHM_VOLUME, SHM_PATH, "Memory")
    return pod


def ray_pods(rayservice: Manifest) -> dict[str, Pod]:
    """ "head" and "worker <group>": the pods KubeRay creates for a RayService."""
    pods = {"head": head_pod(rayservice)}
    for group in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        pods[f"worker {group['groupName']}"] = worker_pod(group)
    return pods
