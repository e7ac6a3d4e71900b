"""Scaling and placement, with Ray's own code: the ingress runs twice, a CPU each, off the head;
the most model and ingress replicas Serve may ask for find workers the autoscaler can add, the
fewest fit the minReplicas workers; on inf2, Serve's and KubeRay's bounds agree core for core
(and the blueprint's autoscaler saw no NeuronCores). Each check also reports a deliberately
broken copy.

Not here: drains and budgets (test_disruption.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.k8s.checks import (
    RAY_KUSTOMIZATIONS,
    RAYSERVICE,
    app_args,
    one,
    rendered,
    serve_config,
    workers,
)
from tests.k8s.kustomize import Manifest
from tests.k8s.rayserve import (
    autoscaler_view,
    ingress_options,
    model_deployment,
    replica_demand,
    serve_app,
)


def ingress_problems(rayservice: Manifest) -> list[str]:
    """Two ingress replicas that each hold a CPU, so Ray places them on workers (the head
    declares none) and one outlives a worker's drain; config entries name real deployments."""
    name, replicas, options = ingress_options(rayservice)
    problems = []
    if replicas < 2:
        problems.append(f"{replicas} {name} replica(s): one worker's drain stops the API")
    if replica_demand(options).get("CPU", 0) <= 0:
        problems.append(f"{name} holds no CPU: Ray may place it on the head, beside GCS")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("the head declares CPUs: replicas may land beside GCS")
    (application,) = serve_config(rayservice)["applications"]
    known = {d.name for d in serve_app(rayservice).deployments}
    for entry in application.get("deployments", []):
        if entry["name"] not in known:
            problems.append(f"serve config names deployment {entry['name']!r}, not in {known}")
    return problems


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_ingress_runs_twice_on_workers(name: str) -> None:
    """The ingress (routes, auth, SSE) runs as two replicas with a CPU each; the head takes no
    Serve replica."""
    assert ingress_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


def _unplaced(
    node_types: dict[str, Any], head: str, demands: list[dict[str, float]]
) -> list[dict[str, float]]:
    """The replicas Ray's autoscaler finds no node for, given at most max_workers per type."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    # As the autoscaler's ResourceDemandScheduler calls it, with no launch failures recorded.
    scorer = functools.partial(
        _default_utilization_scorer,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )
    _, unplaced = get_nodes_for(
        node_types,
        {name: 0 for name in node_types},
        head,
        sum(t["max_workers"] for t in node_types.values()),
        [dict(demand) for demand in demands],
        scorer,
    )
    return unplaced


def scaling_problems(rayservice: Manifest) -> list[str]:
    """The most replicas Serve may ask for (the model's and the ingress's) all find a worker
    the autoscaler can add, and the fewest fit the minReplicas workers (always there)."""
    config = autoscaler_view(rayservice)
    node_types = config["available_node_types"]
    model = model_deployment(rayservice)
    deployment = model._deployment_config
    autoscaling = deployment.autoscaling_config
    low, high = (
        (autoscaling.min_replicas, autoscaling.max_replicas)
        if autoscaling
        else (deployment.num_replicas, deployment.num_replicas)
    )
    demand = replica_demand(model.ray_actor_options)
    _, ingress_replicas, ingress_actor_options = ingress_options(rayservice)
    ingress = [replica_demand(ingress_actor_options)] * ingress_replicas
    problems = []
    if high > low and not rayservice["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling"):
        problems.append("Serve autoscales but the Ray autoscaler is off")
    at_minimum = {n: {**t, "max_workers": t["min_workers"]} for n, t in node_types.items()}
    for replicas, types, where in (
        (high, node_types, "the autoscaler can add"),
        (low, at_minimum, "among the minReplicas workers"),
    ):
        unplaced = _unplaced(types, config["head_node_type"], [demand] * replicas + ingress)
        if unplaced:
            seen = {name: t["resources"] for name, t in node_types.items()}
            problems.append(
                f"{len(unplaced)} of {replicas} model and {len(ingress)} ingress replicas "
                f"({demand}, {ingress[:1]}) find no worker {where}; the autoscaler sees {seen}"
            )
    return problems


@pytest.mark.parametrize("name", ["mistral", "cpu", "cpu-mistral-gguf", "nxdi"])
def test_model_replicas_fit_the_workers_the_autoscaler_can_add(name: str) -> None:
    """Ray's autoscaler code, fed our RayCluster, places max_replicas model replicas and the
    ingress replicas on new workers, and num_replicas with the ingress on the minReplicas
    workers."""
    assert scaling_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


def test_inf2_autoscaling_arithmetic() -> None:
    """Serve 1 to 4 replicas of 2 NeuronCores aiming at a full batch each; KubeRay 1 to 4
    workers of 2 NeuronCores: max replicas x cores per replica = max workers x cores each."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    args = app_args(rayservice)
    autoscaling = model_deployment(rayservice)._deployment_config.autoscaling_config
    assert autoscaling.target_ongoing_requests == args["max_batch_size"]
    (group,) = workers(rayservice)
    inf2 = autoscaler_view(rayservice)["available_node_types"][group["groupName"]]
    assert (inf2["min_workers"], inf2["max_workers"]) == (
        group["minReplicas"],
        group["maxReplicas"],
    )
    assert autoscaling.min_replicas * args["num_neuron_cores"] <= (
        inf2["min_workers"] * inf2["resources"]["neuron_cores"]
    )
    assert autoscaling.max_replicas > autoscaling.min_replicas
    assert autoscaling.max_replicas * args["num_neuron_cores"] == (
        inf2["max_workers"] * inf2["resources"]["neuron_cores"]
    )
    options = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert options["idleTimeoutSeconds"] >= autoscaling.downscale_delay_s


def test_blueprint_autoscaler_saw_no_neuron_cores() -> None:
    """Why the blueprint never grew past one node: without `neuron_cores` in rayStartParams,
    the autoscaler's view of an inf2 worker has CPU and memory only."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    del workers(rayservice)[0]["rayStartParams"]["resources"]
    inf2 = autoscaler_view(rayservice)["available_node_types"]["inf2"]
    assert "neuron_cores" not in inf2["resources"]


def _broken_ingress(**entry: Any) -> list[str]:
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    config = serve_config(rayservice)
    [ingress] = [d for d in config["applications"][0]["deployments"] if d["name"] == "ingress"]
    ingress.update(entry)
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return ingress_problems(rayservice)


def _broken_head_cpus() -> list[str]:
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "2"
    return ingress_problems(rayservice)


def _broken_cpu_worker_room() -> list[str]:
    """The CPU overlay's worker as it was: 2 CPUs, all the model replica's."""
    rayservice = one(rendered("cpu"), "RayService", RAYSERVICE)
    workers(rayservice)[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2"
    return scaling_problems(rayservice)


def _broken_blueprint_resources() -> list[str]:
    """The blueprint's mistake: the device limit alone, no `neuron_cores` the autoscaler sees."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    del workers(rayservice)[0]["rayStartParams"]["resources"]
    return scaling_problems(rayservice)


def _broken_too_many_replicas() -> list[str]:
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    workers(rayservice)[0]["maxReplicas"] = 3
    return scaling_problems(rayservice)


def _broken_autoscaler_off() -> list[str]:
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = False
    return scaling_problems(rayservice)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "one ingress replica": lambda: _broken_ingress(num_replicas=1),
    "ingress without a CPU": lambda: _broken_ingress(ray_actor_options={"num_cpus": 0}),
    "ingress named wrong": lambda: _broken_ingress(name="Ingress"),
    "head with CPUs": _broken_head_cpus,
    "CPU worker without room for the ingress": _broken_cpu_worker_room,
    "blueprint's neuron resources": _broken_blueprint_resources,
    "more replicas than workers": _broken_too_many_replicas,
    "Ray autoscaler off": _broken_autoscaler_off,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
