"""Drains and disruptions: more than one UI pod, with client-IP affinity; every
PodDisruptionBudget lets a drain proceed, one pod at a time (KubeRay's pods: an integer
minAvailable); no Karpenter annotation blocks a node; on EKS a worker's drain leaves a model
replica serving. Each check also reports a deliberately broken copy.

Not here: the NodePool's own disruption settings (the cluster's, k8s/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.k8s.checks import (
    RAYSERVICE,
    UI_DEPLOYMENT,
    UI_SERVICE,
    app_args,
    find,
    one,
    pod_templates,
    ray_resources,
    rendered,
    serve_config,
    workers,
)
from tests.k8s.cluster import ray_pods, ui_pod
from tests.k8s.kustomize import Manifest
from tests.k8s.networkpolicy import Pod, selects
from tests.k8s.rayserve import model_deployment

# Pod annotations with which Karpenter refuses to consolidate, drift or drain a node (the second
# is the name before Karpenter v0.32).
KARPENTER_BLOCKERS = ("karpenter.sh/do-not-disrupt", "karpenter.sh/do-not-evict")


def pod_groups(objects: list[Manifest]) -> dict[str, tuple[Pod, int, bool]]:
    """Each group of like pods: a pod, how many there are at the least, and whether KubeRay
    manages them (a RayCluster has no scale subresource)."""
    groups: dict[str, tuple[Pod, int, bool]] = {}
    rayservice = one(objects, "RayService", RAYSERVICE)
    pods = ray_pods(objects)
    groups["head"] = (pods["head"][0], 1, True)
    for group in workers(rayservice):
        label = f"worker {group['groupName']}"
        groups[label] = (pods[label][0], group.get("minReplicas", group["replicas"]), True)
    deployment = one(objects, "Deployment", UI_DEPLOYMENT)
    groups["UI"] = (ui_pod(objects)[0], deployment["spec"].get("replicas", 1), False)
    return groups


def evictions_allowed(budget: Manifest, pods: int, healthy: int) -> int:
    """The PodDisruptionBudget's disruptionsAllowed for integer minAvailable or maxUnavailable."""
    spec = budget["spec"]
    if "minAvailable" in spec:
        return healthy - int(spec["minAvailable"])
    return int(spec["maxUnavailable"]) - (pods - healthy)


def availability_problems(objects: list[Manifest], serves_through_drains: bool) -> list[str]:
    """Sticky UI sessions; budgets that never block a drain forever yet take workers one at a
    time; no Karpenter annotation that blocks disruption. With `serves_through_drains`, a
    worker's eviction leaves a worker holding a model replica."""
    problems = []
    deployment = one(objects, "Deployment", UI_DEPLOYMENT)
    replicas = deployment["spec"].get("replicas", 1)
    service = one(objects, "Service", UI_SERVICE)["spec"]
    if replicas > 1 and service.get("sessionAffinity") != "ClientIP":
        problems.append(f"{replicas} UI pods but gradio-service has no client-IP affinity")
    budgets = find(objects, "PodDisruptionBudget")
    for label, (pod, count, kuberay_managed) in pod_groups(objects).items():
        mine = [
            b
            for b in budgets
            if b["metadata"]["namespace"] == pod.namespace
            and selects(b["spec"]["selector"], pod.labels)
        ]
        if not mine:
            problems.append(f"{label}: no PodDisruptionBudget")
        for budget in mine:
            name = f"{label}: budget {budget['metadata']['name']}"
            spec = budget["spec"]
            value = spec.get("minAvailable", spec.get("maxUnavailable"))
            if kuberay_managed and not isinstance(spec.get("minAvailable"), int):
                # Kubernetes evaluates maxUnavailable and percentages only through the owner's
                # scale subresource, which a RayCluster lacks.
                problems.append(f"{name}: KubeRay's pods take an integer minAvailable only")
            elif not isinstance(value, int):
                problems.append(f"{name}: {value!r} is not an integer")
            elif evictions_allowed(budget, count, count) < 1:
                problems.append(f"{name}: refuses every eviction at {count} pods (drains hang)")
            elif count > 1 and evictions_allowed(budget, count, count - 1) > 0:
                problems.append(f"{name}: lets a second pod go while one is down")
    for obj in objects:
        for label, template in pod_templates(obj):
            annotations = template["metadata"].get("annotations") or {}
            problems += [
                f"{label}: {a} blocks Karpenter" for a in KARPENTER_BLOCKERS if a in annotations
            ]
    if serves_through_drains:
        problems += drain_service_problems(one(objects, "RayService", RAYSERVICE))
    return problems


def drain_service_problems(rayservice: Manifest) -> list[str]:
    """At the minimum scale, every worker but the one drained still holds a model replica: the
    model's minimum replicas exceed what one worker can hold."""
    args = app_args(rayservice)
    autoscaling = model_deployment(rayservice)._deployment_config.autoscaling_config
    fewest = autoscaling.min_replicas if autoscaling else args["num_replicas"]
    problems = []
    for group in workers(rayservice):
        cores = ray_resources(group["rayStartParams"]).get("neuron_cores", 0)
        per_worker = cores // args["num_neuron_cores"] if args.get("num_neuron_cores") else fewest
        if group.get("minReplicas", group["replicas"]) < 2:
            problems.append(f"worker {group['groupName']}: fewer than 2 workers at the minimum")
        if fewest - per_worker < 1:
            problems.append(
                f"{fewest} model replica(s), {per_worker} per worker: a drain stops the model"
            )
    return problems


@pytest.mark.parametrize(
    ("name", "serves_through_drains"),
    [
        ("root", True),
        ("monitoring", True),
        ("cpu", False),
        ("cpu-mistral-gguf", False),
        ("nxdi", True),
    ],
)
def test_drains_proceed_and_budgets_hold(name: str, serves_through_drains: bool) -> None:
    """More than one UI pod with client-IP affinity; every budget lets a drain proceed, one pod
    at a time; on EKS a worker's drain leaves the model served (the CPU overlays have one)."""
    objects = rendered(name)
    assert one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["replicas"] > 1
    assert availability_problems(objects, serves_through_drains) == []


def _broken_affinity() -> list[str]:
    objects = rendered("root")
    del one(objects, "Service", UI_SERVICE)["spec"]["sessionAffinity"]
    return availability_problems(objects, serves_through_drains=True)


def _with_budget(name: str, spec: dict[str, Any]) -> list[str]:
    objects = rendered("root")
    budget = one(objects, "PodDisruptionBudget", name)["spec"]
    budget.pop("minAvailable", None)
    budget.pop("maxUnavailable", None)
    budget.update(spec)
    return availability_problems(objects, serves_through_drains=True)


def _broken_do_not_disrupt() -> list[str]:
    objects = rendered("root")
    template = workers(one(objects, "RayService", RAYSERVICE))[0]["template"]
    template["metadata"]["annotations"] = {"karpenter.sh/do-not-disrupt": "true"}
    return availability_problems(objects, serves_through_drains=True)


def _broken_one_worker() -> list[str]:
    objects = rendered("root")
    group = workers(one(objects, "RayService", RAYSERVICE))[0]
    group["minReplicas"] = group["replicas"] = 1
    return availability_problems(objects, serves_through_drains=True)


def _broken_one_model_replica() -> list[str]:
    objects = rendered("root")
    rayservice = one(objects, "RayService", RAYSERVICE)
    _edit_args(rayservice, num_replicas=1)
    return availability_problems(objects, serves_through_drains=True)


def _edit_args(rayservice: Manifest, **args: Any) -> None:
    config = serve_config(rayservice)
    config["applications"][0]["args"].update(args)
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "no client-IP affinity": _broken_affinity,
    "UI budget that blocks drains": lambda: _with_budget("gradio", {"minAvailable": 2}),
    "head budget that refuses eviction": lambda: _with_budget("ray-head", {"minAvailable": 1}),
    "maxUnavailable on KubeRay's pods": lambda: _with_budget("ray-workers", {"maxUnavailable": 1}),
    "workers' budget lets two go": lambda: _with_budget("ray-workers", {"minAvailable": 0}),
    "do-not-disrupt on workers": _broken_do_not_disrupt,
    "one worker at the minimum": _broken_one_worker,
    "one model replica": _broken_one_model_replica,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
