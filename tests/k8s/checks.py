"""The shared ground of tests/k8s: the kustomizations and the names they must keep, their
rendered objects (`rendered`, a fresh copy each call) and ways about them (pod templates,
containers, the serve config and its args, quantities), and `placeholder_problems`, the one check
several subjects use.

Not here: the checks of one subject, which live in its test module beside the deliberately broken
copies that prove them (test_secrets.py, test_network_policies.py, ...); the pods KubeRay builds
(kuberay.py); what Ray's own code makes of the manifests (rayserve.py); the cluster's pods as
label selectors see them (cluster.py); Dockerfiles (dockerfiles.py).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.kustomize import Manifest, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUSTOMIZATIONS = {
    "root": K8S,
    "mistral": K8S / "mistral",
    "gradio": K8S / "gradio",
    "cpu": K8S / "overlays" / "cpu",
    "monitoring": K8S / "overlays" / "monitoring",
    "cpu-mistral-gguf": K8S / "overlays" / "cpu-mistral-gguf",
    "nxdi": K8S / "overlays" / "nxdi",
}
RAY_KUSTOMIZATIONS = ["root", "mistral", "cpu", "cpu-mistral-gguf", "nxdi"]
K8S_VERSION = "1.33.0"  # an EKS standard-support version
PLACEHOLDER = "ghcr.io/OWNER"  # upper case: not a valid image name, so it cannot be pulled
SERVE_IMAGE = f"{PLACEHOLDER}/mistral-inf2-chat-serve"
UI_IMAGE = f"{PLACEHOLDER}/mistral-inf2-chat-ui"
IMAGE_TAG = "0.1.0"
RAY_NAMESPACE = "mistral"
RAYSERVICE = "mistral"
UI_NAMESPACE = "gradio-mistral7b-inf2"
UI_DEPLOYMENT = "gradio-deployment"
UI_SERVICE = "gradio-service"
UI_PORT = 7860
SERVE_PORT = 8000
BACKEND_URL = "http://mistral-serve-svc.mistral.svc.cluster.local:8000"
HF_SECRET = {"name": "hf-token", "key": "hf-token"}
HF_TOKEN_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
API_KEY_SECRET = {"name": "llm-api-key", "key": "api-key"}
NEURON_DEVICE = "aws.amazon.com/neuron"
CORES_PER_INF2_DEVICE = 2


@functools.cache
def _rendered(name: str) -> tuple[Manifest, ...]:
    return tuple(render(KUSTOMIZATIONS[name]))


def rendered(name: str) -> list[Manifest]:
    """A fresh copy of a kustomization's objects (tests may modify it)."""
    return copy.deepcopy(list(_rendered(name)))


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """Objects of one kind (and name)."""
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    """The single object of that kind and name."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def key(obj: Manifest) -> tuple[str, str, str, str]:
    """Sort key of an object."""
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def pod_templates(obj: Manifest) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod template) of a workload or of each RayService group."""
    if obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker {group['groupName']}", group["template"]
    elif obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        yield obj["kind"], obj["spec"]["template"]


def containers(obj: Manifest) -> Iterator[dict[str, Any]]:
    """Every container and init container of an object's pod templates."""
    for _, template in pod_templates(obj):
        spec = template["spec"]
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key twice in one mapping (PyYAML would keep the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        name = loader.construct_object(key_node, deep=True)
        if name in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {name!r} twice", key_node.start_mark
            )
        seen.add(name)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def serve_config(rayservice: Manifest) -> dict[str, Any]:
    """The parsed serveConfigV2 (a key twice in one mapping is an error)."""
    return yaml.load(rayservice["spec"]["serveConfigV2"], Loader=_UniqueKeyLoader)


def app_args(rayservice: Manifest) -> dict[str, Any]:
    """The `args` of the one Serve application."""
    (application,) = serve_config(rayservice)["applications"]
    return application.get("args", {})


def workers(rayservice: Manifest) -> list[dict[str, Any]]:
    """The RayService's worker groups."""
    return rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def ui_container(objects: list[Manifest]) -> dict[str, Any]:
    """The UI Deployment's container."""
    return one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]


def gguf_fetch(objects: list[Manifest]) -> dict[str, Any]:
    """The GGUF overlay's `fetch-gguf` init container."""
    (group,) = workers(one(objects, "RayService", RAYSERVICE))
    [fetch] = [c for c in group["template"]["spec"]["initContainers"] if c["name"] == "fetch-gguf"]
    return fetch


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number ("500m" -> 0.5, "2Gi" -> 2147483648)."""
    match = _QUANTITY.match(str(value))
    assert match, f"unparsable quantity {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def ray_resources(start_params: dict[str, str]) -> dict[str, float]:
    """Custom resources of `rayStartParams.resources`, parsed the way KubeRay parses them."""
    raw = start_params.get("resources")
    return json.loads(raw.strip("'\"` ")) if raw else {}


def placeholder_problems(objects: list[Manifest]) -> list[str]:
    """Containers and init containers whose image is still a `ghcr.io/OWNER` placeholder."""
    return [
        f"{key(obj)[1]}/{key(obj)[3]} {container['name']}: {container['image']}"
        for obj in objects
        for container in containers(obj)
        if container["image"].startswith(PLACEHOLDER + "/")
    ]
