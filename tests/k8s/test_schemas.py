"""Schemas: built-in objects and the Ray pod templates validate strictly against Kubernetes'
(kubernetes-validate, the K8S_VERSION of checks.py); the RayService validates strictly against the
CRDs of the oldest KubeRay k8s/README.md requires and of the newest checked, uses no deprecated
field, and its rayStartParams are live `ray start` options. Each check also reports a deliberately
broken copy.

Not here: the PodMonitor, whose CRD has no schema here (test_monitoring.py checks it field by
field), and what KubeRay does with the fields (kuberay.py, test_pod_security.py).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.k8s.checks import (
    K8S,
    K8S_VERSION,
    KUSTOMIZATIONS,
    RAY_KUSTOMIZATIONS,
    RAYSERVICE,
    SCHEMAS,
    one,
    pod_templates,
    rendered,
    ui_container,
)
from tests.k8s.kustomize import Manifest

# Kinds of CRDs without a schema here: checked field by field (test_monitoring.py).
STRUCTURAL_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
# Kept by KubeRay (`memory`, `labels` are hidden in `ray start`; KubeRay sets these itself).
KUBERAY_MANAGED_START_PARAMS = {"address", "block", "head", "node-ip-address", "port"}
DEPRECATED_RAYSERVICE_FIELDS = {
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# The KubeRay releases whose RayService CRD schemas are in schemas/: the oldest k8s/README.md
# requires, and the newest checked.
KUBERAY_OLDEST, KUBERAY_NEWEST = "1.3.0", "1.7.0"


def core_object_problems(objects: list[Manifest]) -> list[str]:
    """kubernetes-validate --strict on built-in kinds and on the RayService pod templates."""
    problems = []
    documents = []
    for obj in objects:
        if obj["kind"] == "RayService":
            for label, template in pod_templates(obj):
                name = f"{obj['metadata']['name']}-{label.replace(' ', '-')}"
                documents.append(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": name},
                        "template": template,
                    }
                )
        elif (obj["apiVersion"], obj["kind"]) not in STRUCTURAL_KINDS:
            documents.append(obj)
    for document in documents:
        try:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            problems.append(f"{document['kind']}/{document['metadata']['name']}: {path}: {exc}")
    return problems


def strict_schema(node: Any) -> Any:
    """A CRD schema that rejects fields it does not list (the API server would prune them)."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict_schema(node["items"])
    for combinator in ("anyOf", "allOf", "oneOf"):
        if combinator in node:
            node[combinator] = [strict_schema(sub) for sub in node[combinator]]
    return node


@functools.cache
def rayservice_validator(kuberay: str) -> jsonschema.Draft7Validator:
    """Validator of the ray.io/v1 RayService CRD schema of a KubeRay release, made strict."""
    path = SCHEMAS / f"ray.io_rayservices_v1.kuberay-v{kuberay}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    schema = json.loads(path.read_text())
    return jsonschema.Draft7Validator(strict_schema(schema))


def crd_problems(rayservice: Manifest, kuberay: str = KUBERAY_NEWEST) -> list[str]:
    """The RayService against the strict CRD schema of a KubeRay release."""
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in rayservice_validator(kuberay).iter_errors(rayservice)
    ]


@functools.cache
def ray_start_options() -> dict[str, bool]:
    """`ray start` long options of the installed Ray, mapped to whether they are hidden."""
    from ray.scripts.scripts import start

    return {
        opt[2:]: bool(param.hidden)
        for param in start.params
        for opt in param.opts
        if opt.startswith("--")
    }


def deprecation_problems(rayservice: Manifest) -> list[str]:
    """Deprecated RayService fields, retired or KubeRay-managed `ray start` parameters."""
    spec = rayservice["spec"]
    problems = [
        f"deprecated field spec.{name}" for name in DEPRECATED_RAYSERVICE_FIELDS & set(spec)
    ]
    upgrade = spec.get("upgradeStrategy", {}).get("type")
    if upgrade not in UPGRADE_TYPES:
        problems.append(f"spec.upgradeStrategy.type {upgrade!r} not in {sorted(UPGRADE_TYPES)}")
    cluster = spec["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in cluster.get("workerGroupSpecs", [])]
    options = ray_start_options()
    for label, group in groups:
        for param in group.get("rayStartParams", {}):
            if param not in options:
                problems.append(f"{label}: `ray start` has no --{param}")
            elif options[param]:
                problems.append(f"{label}: --{param} is hidden (deprecated or KubeRay's own)")
            elif param in KUBERAY_MANAGED_START_PARAMS:
                problems.append(f"{label}: --{param} is set by KubeRay")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_objects_validate_strictly(name: str) -> None:
    """Built-in kinds and the Ray pod templates pass kubernetes-validate --strict."""
    assert core_object_problems(rendered(name)) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_rayservice_matches_the_crd_schema_strictly(name: str) -> None:
    """No field the newest KubeRay checked (v1.7.0) does not declare: it would prune it."""
    assert crd_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_rayservice_fits_the_oldest_kuberay_required(name: str) -> None:
    """No field the oldest KubeRay k8s/README.md requires (v1.3.0) lacks: it would prune it."""
    assert crd_problems(one(rendered(name), "RayService", RAYSERVICE), KUBERAY_OLDEST) == []


def test_readme_requires_the_oldest_kuberay_checked() -> None:
    """k8s/README.md states the KubeRay version once, and it is the oldest one checked here."""
    text = (K8S / "README.md").read_text()
    stated = re.findall(r"KubeRay operator (\d+\.\d+) or newer", text)
    assert stated == [KUBERAY_OLDEST.rpartition(".")[0]]
    assert KUBERAY_OLDEST.endswith(".0")  # a minor's first release: its whole line qualifies


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_rayservice_uses_current_fields_only(name: str) -> None:
    """No deprecated spec fields; rayStartParams are live `ray start` options."""
    assert deprecation_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


def _rayservice(name: str = "mistral") -> Manifest:
    return one(rendered(name), "RayService", RAYSERVICE)


def _worker(rayservice: Manifest) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _broken_crd() -> list[str]:
    rayservice = _rayservice()
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 1
    return crd_problems(rayservice)


def _broken_deprecated() -> list[str]:
    rayservice = _rayservice()
    rayservice["spec"]["serviceUnhealthySecondThreshold"] = 900
    return deprecation_problems(rayservice)


def _broken_start_params() -> list[str]:
    rayservice = _rayservice()
    _worker(rayservice)["rayStartParams"]["memory"] = "1000"
    return deprecation_problems(rayservice)


def _broken_core() -> list[str]:
    objects = rendered("gradio")
    ui_container(objects)["readinesProbe"] = {}
    return core_object_problems(objects)


def _broken_pod_template() -> list[str]:
    rayservice = _rayservice()
    _worker(rayservice)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = []
    return core_object_problems([rayservice])


def _broken_newer_field() -> list[str]:
    """A field of a later KubeRay (rayClusterDeletionDelaySeconds: v1.5) on the oldest one."""
    rayservice = _rayservice()
    rayservice["spec"]["rayClusterDeletionDelaySeconds"] = 120
    assert crd_problems(rayservice) == []
    return crd_problems(rayservice, KUBERAY_OLDEST)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "crd unknown field": _broken_crd,
    "field newer than the oldest KubeRay required": _broken_newer_field,
    "deprecated field": _broken_deprecated,
    "hidden ray start param": _broken_start_params,
    "core object unknown field": _broken_core,
    "ray pod template type": _broken_pod_template,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
