"""Offline checks of running it in a cluster: secrets as files, network policies, autoscaling and
the ingress replicas, the UI's replicas, disruption budgets and drains, monitoring (PodMonitor,
Grafana dashboard). The image targets of the Makefile: test_make.py.

As in test_manifests.py, each check returns a list of problems; `test_checks_catch_broken_setups`
proves each one reports a deliberately broken copy of the real manifests.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.k8s import dashboard
from tests.k8s.checks import (
    KUSTOMIZATIONS,
    RAY_KUSTOMIZATIONS,
    RAY_NAMESPACE,
    RAYSERVICE,
    SERVE_PORT,
    UI_DEPLOYMENT,
    UI_NAMESPACE,
    UI_PORT,
    UI_SERVICE,
    app_args,
    find,
    one,
    pod_templates,
    ray_resources,
    rendered,
    secret_problems,
    serve_config,
    workers,
)
from tests.k8s.kustomize import Manifest
from tests.k8s.networkpolicy import Endpoint, External, Pod, allowed, ray_pod, selects

MONITORING_NAMESPACE = "monitoring"
OPERATOR_NAMESPACE = "kuberay-operator"
# PodMonitor spec fields (monitoring.coreos.com/v1, prometheus-operator API reference).
PODMONITOR_SPEC_FIELDS = {
    "jobLabel",
    "podTargetLabels",
    "podMetricsEndpoints",
    "selector",
    "namespaceSelector",
    "sampleLimit",
    "targetLimit",
    "attachMetadata",
}
ENDPOINT_FIELDS = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings"}


# --- the pods of a rendered kustomization ---------------------------------------------------


def container_ports(template: dict[str, Any]) -> dict[str, int]:
    """Named container ports of a pod template."""
    return {
        port["name"]: port["containerPort"]
        for container in template["spec"]["containers"]
        for port in container.get("ports", [])
        if "name" in port
    }


def ray_pods(objects: list[Manifest]) -> dict[str, tuple[Pod, dict[str, Any]]]:
    """ "head" and each worker group: the pod KubeRay makes, and its template."""
    rayservice = one(objects, "RayService", RAYSERVICE)
    pods = {}
    for label, template in pod_templates(rayservice):
        node_type, _, group = label.partition(" ")
        pod = ray_pod(template, RAY_NAMESPACE, node_type, group or "headgroup", "mistral-abc12")
        pods[label] = (pod, template)
    return pods


def ui_pod(objects: list[Manifest]) -> tuple[Pod, dict[str, Any]]:
    """The UI's pod and its template."""
    template = one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["template"]
    return Pod(UI_NAMESPACE, template["metadata"]["labels"]), template


def namespace_labels(objects: list[Manifest]) -> dict[str, dict[str, str]]:
    """Labels of the rendered namespaces and of the cluster's others, with the name label
    Kubernetes puts on every namespace."""
    names = {MONITORING_NAMESPACE, OPERATOR_NAMESPACE, "kube-system", "default"}
    labels = {name: {} for name in names}
    for namespace in find(objects, "Namespace"):
        labels[namespace["metadata"]["name"]] = namespace["metadata"].get("labels", {})
    return {n: {**v, "kubernetes.io/metadata.name": n} for n, v in labels.items()}


# --- network policies -----------------------------------------------------------------------

DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
PROMETHEUS = Pod(MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"})
OPERATOR = Pod(OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "kuberay-operator"})
STRANGER = Pod("default", {"app": "curl"})
UI_NEIGHBOUR = Pod(UI_NAMESPACE, {"app": "debug"})
HUB = External("18.239.50.1")  # a public address (huggingface.co's CDN)
KUBE_API = External("10.0.32.10")  # an EKS API endpoint: an ENI in the VPC
PRIVATE_SERVICE = External("192.168.7.7")  # something else inside the network, on 443


def network_problems(objects: list[Manifest]) -> list[str]:
    """Who may reach whom, evaluated from the rendered NetworkPolicies and pod labels."""
    policies = find(objects, "NetworkPolicy")
    namespaces = namespace_labels(objects)
    pods = ray_pods(objects)
    head, head_template = pods["head"]
    [(worker, worker_template)] = [v for k, v in pods.items() if k != "head"]
    ui, ui_template = ui_pod(objects)
    serve = container_ports(worker_template)["serve"]
    metrics = container_ports(worker_template)["metrics"]
    head_ports = container_ports(head_template)
    assert serve == head_ports["serve"] == SERVE_PORT
    assert container_ports(ui_template)["http"] == UI_PORT
    ray_worker_port = 10_123  # Ray's worker ports are picked from 10002-19999
    gcs, dashboard_port, client = (head_ports[p] for p in ("gcs-server", "dashboard", "client"))
    # (what, source, destination, port, protocol, expected). Denials also say which side's
    # policies must refuse on their own ("in": the destination's, "out": the source's), so
    # neither namespace relies on the other one's policies.
    allow, deny_in, deny_out, deny_both = (
        (True, None),
        (False, "in"),
        (False, "out"),
        (False, "both"),
    )
    cases: list[tuple[str, Endpoint, Endpoint, int, str, tuple[bool, str | None]]] = [
        ("UI -> serve (workers)", ui, worker, serve, "TCP", allow),
        ("UI -> serve (head)", ui, head, serve, "TCP", allow),
        ("UI -> GCS", ui, head, gcs, "TCP", deny_both),
        ("UI -> dashboard", ui, head, dashboard_port, "TCP", deny_both),
        ("UI -> Ray client", ui, head, client, "TCP", deny_both),
        ("UI -> metrics", ui, worker, metrics, "TCP", deny_both),
        ("UI -> DNS", ui, DNS, 53, "UDP", allow),
        ("UI -> internet", ui, HUB, 443, "TCP", deny_out),
        ("UI's namespace, another pod -> serve", UI_NEIGHBOUR, worker, serve, "TCP", deny_both),
        ("other namespace -> serve", STRANGER, worker, serve, "TCP", deny_in),
        ("other namespace -> dashboard", STRANGER, head, dashboard_port, "TCP", deny_in),
        ("other namespace -> GCS", STRANGER, head, gcs, "TCP", deny_in),
        ("worker -> GCS", worker, head, gcs, "TCP", allow),
        ("head -> worker port", head, worker, ray_worker_port, "TCP", allow),
        ("worker -> worker port", worker, worker, ray_worker_port, "TCP", allow),
        ("worker -> DNS", worker, DNS, 53, "UDP", allow),
        ("worker -> Hugging Face hub", worker, HUB, 443, "TCP", allow),
        ("worker -> internet, plain HTTP", worker, HUB, 80, "TCP", deny_out),
        ("worker -> UI", worker, ui, UI_PORT, "TCP", deny_out),
        ("worker -> Kubernetes API", worker, KUBE_API, 443, "TCP", deny_out),
        ("worker -> a private address", worker, PRIVATE_SERVICE, 443, "TCP", deny_out),
        ("head autoscaler -> Kubernetes API", head, KUBE_API, 443, "TCP", allow),
        ("head -> Kubernetes API, plain HTTP", head, KUBE_API, 80, "TCP", deny_out),
        ("head -> internet", head, HUB, 443, "TCP", deny_out),
        ("Prometheus -> worker metrics", PROMETHEUS, worker, metrics, "TCP", allow),
        ("Prometheus -> head metrics", PROMETHEUS, head, head_ports["metrics"], "TCP", allow),
        ("Prometheus -> serve", PROMETHEUS, worker, serve, "TCP", deny_in),
        ("operator -> dashboard", OPERATOR, head, dashboard_port, "TCP", allow),
        ("operator -> GCS", OPERATOR, head, gcs, "TCP", deny_in),
        ("anyone -> UI", STRANGER, ui, UI_PORT, "TCP", allow),
        ("anyone -> UI, another port", STRANGER, ui, 8080, "TCP", deny_in),
    ]

    def of(endpoint: Endpoint) -> list[Manifest]:
        namespace = endpoint.namespace if isinstance(endpoint, Pod) else None
        return [p for p in policies if p["metadata"]["namespace"] == namespace]

    problems = []
    for what, source, destination, port, protocol, (expected, side) in cases:
        if allowed(policies, namespaces, source, destination, port, protocol) != expected:
            problems.append(f"{what}: {'allowed' if expected else 'denied'} expected")
        sides = {"in": [destination], "out": [source], "both": [destination, source]}
        for alone in sides.get(side or "", []):
            if allowed(of(alone), namespaces, source, destination, port, protocol):
                problems.append(f"{what}: the policies of {alone.namespace} alone let it through")
    return problems


def default_deny_problems(objects: list[Manifest]) -> list[str]:
    """Each namespace denies by default, both ways: only what a policy names gets through."""
    problems = []
    for namespace in (RAY_NAMESPACE, UI_NAMESPACE):
        if not [
            policy
            for policy in find(objects, "NetworkPolicy")
            if policy["metadata"]["namespace"] == namespace
            and policy["spec"]["podSelector"] == {}
            and set(policy["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not policy["spec"].get("ingress")
            and not policy["spec"].get("egress")
        ]:
            problems.append(f"namespace {namespace}: no default-deny policy")
    return problems


@pytest.mark.parametrize("name", ["root", "monitoring"])
def test_network_policies_admit_exactly_what_each_side_needs(name: str) -> None:
    """The serve port for the UI and Ray, Ray's ports for Ray (metrics: Prometheus, dashboard:
    the operator), 7860 for the UI; egress to the serve port, DNS, the hub and the API only."""
    objects = rendered(name)
    assert network_problems(objects) == []
    assert default_deny_problems(objects) == []


def test_every_policy_selects_pods_that_exist() -> None:
    """No policy aims at a label nothing carries (it would protect nothing)."""
    objects = rendered("root")
    pods = [pod for pod, _ in ray_pods(objects).values()] + [ui_pod(objects)[0]]
    for policy in find(objects, "NetworkPolicy"):
        namespace = policy["metadata"]["namespace"]
        assert any(
            pod.namespace == namespace and selects(policy["spec"]["podSelector"], pod.labels)
            for pod in pods
        ), policy["metadata"]["name"]


# --- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_secrets_are_read_only_files(name: str) -> None:
    """The API key as a file on every Ray pod (LLM_API_KEY_FILE) and the UI
    (CHATUI_API_KEY_FILE), from Secret llm-api-key; the hub token only where HF_TOKEN_PATH
    names it; no secret in an environment variable."""
    assert secret_problems(rendered(name)) == []


# --- autoscaling ----------------------------------------------------------------------------


def autoscaler_view(rayservice: Manifest) -> dict[str, Any]:
    """The autoscaling config the Ray autoscaler derives from the RayCluster (Ray's own code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cluster = {
        "metadata": {"name": "mistral-abc12", "namespace": RAY_NAMESPACE},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    return _derive_autoscaling_config_from_ray_cr(cluster)


def serve_app(rayservice: Manifest) -> Any:
    """The application as Ray Serve builds it from the manifest's import path and args."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from backend.app import build_app

    (application,) = serve_config(rayservice)["applications"]
    return build_serve_app(build_app(application["args"]), name=application["name"])


def model_deployment(rayservice: Manifest) -> Any:
    """The model deployment as Ray Serve builds it from the manifest's application."""
    [model] = [d for d in serve_app(rayservice).deployments if d.name == "model"]
    return model


def replica_demand(ray_actor_options: dict[str, Any]) -> dict[str, float]:
    """The Ray resources one replica asks for (Serve's default: one CPU)."""
    demand = {"CPU": float(ray_actor_options.get("num_cpus", 1))}
    demand.update(ray_actor_options.get("resources") or {})
    return {name: amount for name, amount in demand.items() if amount}


def ingress_options(rayservice: Manifest) -> tuple[str, int, dict[str, Any]]:
    """Name, replicas and ray_actor_options of the ingress deployment as Serve runs it: the
    serve config's `deployments` entry replaces what the code sets (Serve's
    `override_deployment_info` takes a config's ray_actor_options whole)."""
    built = serve_app(rayservice)
    name = built.ingress_deployment_name
    [code] = [d for d in built.deployments if d.name == name]
    (application,) = serve_config(rayservice)["applications"]
    override = {d["name"]: d for d in application.get("deployments", [])}.get(name, {})
    replicas = override.get("num_replicas", code._deployment_config.num_replicas)
    return name, replicas, override.get("ray_actor_options", code.ray_actor_options or {})


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


@pytest.mark.parametrize("name", ["mistral", "cpu", "cpu-mistral-gguf"])
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


# --- the UI's replicas, disruption budgets --------------------------------------------------

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
    [("root", True), ("monitoring", True), ("cpu", False), ("cpu-mistral-gguf", False)],
)
def test_drains_proceed_and_budgets_hold(name: str, serves_through_drains: bool) -> None:
    """More than one UI pod with client-IP affinity; every budget lets a drain proceed, one pod
    at a time; on EKS a worker's drain leaves the model served (the CPU overlays have one)."""
    objects = rendered(name)
    assert one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["replicas"] > 1
    assert availability_problems(objects, serves_through_drains) == []


# --- monitoring -----------------------------------------------------------------------------


def podmonitor_problems(objects: list[Manifest]) -> list[str]:
    """The PodMonitor scrapes every Ray pod on its metrics port, and the policy lets it in."""
    problems = []
    monitors = find(objects, "PodMonitor")
    if not monitors:
        return ["no PodMonitor"]
    pods = ray_pods(objects)
    scraped: set[str] = set()
    for monitor in monitors:
        spec = monitor["spec"]
        name = monitor["metadata"]["name"]
        if monitor["apiVersion"] != "monitoring.coreos.com/v1":
            problems.append(f"{name}: apiVersion {monitor['apiVersion']}")
        if (
            monitor["metadata"].get("namespace") != RAY_NAMESPACE
            and "namespaceSelector" not in spec
        ):
            problems.append(f"{name}: not in {RAY_NAMESPACE} and no namespaceSelector")
        problems += [
            f"{name}: unknown spec.{f}" for f in sorted(set(spec) - PODMONITOR_SPEC_FIELDS)
        ]
        for endpoint in spec.get("podMetricsEndpoints", []):
            unknown = set(endpoint) - ENDPOINT_FIELDS
            problems += [f"{name}: unknown endpoint field {f}" for f in sorted(unknown)]
        for label, (pod, template) in pods.items():
            if not selects(spec["selector"], pod.labels):
                continue
            scraped.add(label)
            ports = container_ports(template)
            for endpoint in spec["podMetricsEndpoints"]:
                if endpoint["port"] not in ports:
                    problems.append(f"{name}: {label} has no port named {endpoint['port']}")
                    continue
                if not allowed(
                    find(objects, "NetworkPolicy"),
                    namespace_labels(objects),
                    PROMETHEUS,
                    pod,
                    ports[endpoint["port"]],
                ):
                    problems.append(f"{name}: the policies keep Prometheus off {label}")
    problems += [f"{label} is not scraped" for label in sorted(set(pods) - scraped)]
    return problems


def test_monitoring_overlay_scrapes_every_ray_pod() -> None:
    """The optional component adds a PodMonitor for head and workers, and nothing else."""
    objects = rendered("monitoring")
    assert podmonitor_problems(objects) == []
    base = rendered("root")
    assert find(base, "PodMonitor") == []  # not every cluster has the operator's CRD
    added = [obj for obj in objects if obj not in base]
    assert [obj["kind"] for obj in added] == ["PodMonitor"]


def dashboard_problems(board: dict[str, Any]) -> list[str]:
    """Every query names only metrics the backend exports, and the views the issue asks for."""
    exported = dashboard.exported_names()
    problems = [
        f"{where}: {name} is not exported"
        for where, names in dashboard.metric_names(board).items()
        for name in sorted(names - exported)
    ]
    exprs = " ".join(expr for _, expr in dashboard.queries(board))
    for histogram in (
        "ray_vllm_time_to_first_token_seconds",
        "ray_vllm_inter_token_latency_seconds",
    ):
        for quantile in ("0.5", "0.9", "0.99"):
            if f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" not in exprs:
                problems.append(f"no p{quantile} of {histogram}")
    used = set().union(*dashboard.metric_names(board).values())
    required = {
        "ray_vllm_generation_tokens_total",
        "ray_vllm_num_requests_running",
        "ray_vllm_num_requests_waiting",
        "ray_chat_requests_rejected_total",
        "ray_serve_num_http_error_requests_total",
        "ray_serve_deployment_replica_healthy",
    }
    problems += [f"no panel shows {name}" for name in sorted(required - used)]
    return problems


def test_dashboard_queries_only_metrics_the_backend_exports() -> None:
    """Names derived from backend/metrics.py's definitions and Ray Serve's source."""
    assert len(dashboard.backend_definitions()) >= 9
    assert dashboard_problems(dashboard.load()) == []


# --- the checks themselves can fail ---------------------------------------------------------


def _policy(objects: list[Manifest], namespace: str, name: str) -> dict[str, Any]:
    [policy] = [
        p for p in find(objects, "NetworkPolicy", name) if p["metadata"]["namespace"] == namespace
    ]
    return policy["spec"]


def _broken_serve_peer() -> list[str]:
    objects = rendered("root")
    # The UI namespace only, not its UI pods: any pod there reaches the API.
    del _policy(objects, RAY_NAMESPACE, "ray-cluster")["ingress"][1]["from"][0]["podSelector"]
    return network_problems(objects)


def _broken_internal_peer() -> list[str]:
    objects = rendered("root")
    _policy(objects, RAY_NAMESPACE, "ray-cluster")["ingress"][0]["from"] = []  # from anywhere
    return network_problems(objects)


def _broken_ui_egress() -> list[str]:
    objects = rendered("root")
    _policy(objects, UI_NAMESPACE, "chatui")["egress"][0]["ports"][0]["port"] = 8265
    return network_problems(objects)


def _broken_no_default_deny() -> list[str]:
    objects = [o for o in rendered("root") if o["metadata"]["name"] != "default-deny"]
    return default_deny_problems(objects)


def _ray_spec(objects: list[Manifest], group: str) -> dict[str, Any]:
    cluster = one(objects, "RayService", RAYSERVICE)["spec"]["rayClusterConfig"]
    spec = cluster["headGroupSpec"] if group == "head" else cluster["workerGroupSpecs"][0]
    return spec["template"]["spec"]


def _env(container: dict[str, Any], name: str) -> dict[str, Any]:
    [entry] = [e for e in container["env"] if e["name"] == name]
    return entry


def _broken_key_as_env() -> list[str]:
    objects = rendered("root")
    ui = one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]
    ref = {"secretKeyRef": {"name": "llm-api-key", "key": "api-key"}}
    ui["env"].append({"name": "CHATUI_API_KEY", "valueFrom": ref})
    return secret_problems(objects)


def _broken_key_optional() -> list[str]:
    objects = rendered("root")
    for volume in _ray_spec(objects, "worker")["volumes"]:
        if volume.get("secret", {}).get("secretName") == "llm-api-key":
            volume["secret"]["optional"] = True
    return secret_problems(objects)


def _broken_key_path() -> list[str]:
    objects = rendered("root")
    _env(_ray_spec(objects, "worker")["containers"][0], "LLM_API_KEY_FILE")["value"] += ".txt"
    return secret_problems(objects)


def _broken_key_missing_on_head() -> list[str]:
    objects = rendered("root")
    head = _ray_spec(objects, "head")["containers"][0]
    head["env"] = [e for e in head["env"] if e["name"] != "LLM_API_KEY_FILE"]
    return secret_problems(objects)


def _broken_hub_token_env() -> list[str]:
    objects = rendered("root")
    ref = {"secretKeyRef": {"name": "hf-token", "key": "hf-token"}}
    worker = _ray_spec(objects, "worker")["containers"][0]
    worker["env"].append({"name": "HUGGING_FACE_HUB_TOKEN", "valueFrom": ref})
    return secret_problems(objects)


def _broken_hub_token_path() -> list[str]:
    objects = rendered("root")
    _env(_ray_spec(objects, "worker")["containers"][0], "HF_TOKEN_PATH")["value"] = "/data/hf/token"
    return secret_problems(objects)


def _broken_head_egress() -> list[str]:
    objects = rendered("root")
    _policy(objects, RAY_NAMESPACE, "ray-head-to-kubernetes-api")["egress"][0]["to"] = [
        {"ipBlock": {"cidr": "0.0.0.0/0"}}
    ]
    return network_problems(objects)


def _broken_worker_egress() -> list[str]:
    objects = rendered("root")
    egress = _policy(objects, RAY_NAMESPACE, "ray-workers-to-hugging-face")["egress"]
    del egress[0]["to"][0]["ipBlock"]["except"]
    return network_problems(objects)


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


def _broken_podmonitor_port() -> list[str]:
    objects = rendered("monitoring")
    one(objects, "PodMonitor", "ray")["spec"]["podMetricsEndpoints"][0]["port"] = "prometheus"
    return podmonitor_problems(objects)


def _broken_podmonitor_policy() -> list[str]:
    objects = rendered("monitoring")
    ingress = _policy(objects, RAY_NAMESPACE, "ray-cluster")["ingress"]
    ingress[2]["from"][0]["namespaceSelector"]["matchLabels"] = {"team": "observability"}
    return podmonitor_problems(objects)


def _broken_dashboard_metric() -> list[str]:
    board = copy.deepcopy(dashboard.load())
    target = board["panels"][0]["targets"][0]
    target["expr"] = target["expr"].replace("generation_tokens_total", "generated_tokens_total")
    return dashboard_problems(board)


def _broken_dashboard_quantile() -> list[str]:
    board = json.loads(json.dumps(dashboard.load()).replace("histogram_quantile(0.99", "max(0.99"))
    return dashboard_problems(board)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "serve port open to the UI's whole namespace": _broken_serve_peer,
    "Ray ports open to anyone": _broken_internal_peer,
    "UI egress to the wrong port": _broken_ui_egress,
    "no default deny": _broken_no_default_deny,
    "key as an environment variable": _broken_key_as_env,
    "key Secret optional": _broken_key_optional,
    "key file path not the mount": _broken_key_path,
    "key missing on the head": _broken_key_missing_on_head,
    "hub token as an environment variable": _broken_hub_token_env,
    "hub token path not the mount": _broken_hub_token_path,
    "head egress to the internet": _broken_head_egress,
    "worker egress into the network": _broken_worker_egress,
    "one ingress replica": lambda: _broken_ingress(num_replicas=1),
    "ingress without a CPU": lambda: _broken_ingress(ray_actor_options={"num_cpus": 0}),
    "ingress named wrong": lambda: _broken_ingress(name="Ingress"),
    "head with CPUs": _broken_head_cpus,
    "CPU worker without room for the ingress": _broken_cpu_worker_room,
    "blueprint's neuron resources": _broken_blueprint_resources,
    "more replicas than workers": _broken_too_many_replicas,
    "Ray autoscaler off": _broken_autoscaler_off,
    "no client-IP affinity": _broken_affinity,
    "UI budget that blocks drains": lambda: _with_budget("gradio", {"minAvailable": 2}),
    "head budget that refuses eviction": lambda: _with_budget("ray-head", {"minAvailable": 1}),
    "maxUnavailable on KubeRay's pods": lambda: _with_budget("ray-workers", {"maxUnavailable": 1}),
    "workers' budget lets two go": lambda: _with_budget("ray-workers", {"minAvailable": 0}),
    "do-not-disrupt on workers": _broken_do_not_disrupt,
    "one worker at the minimum": _broken_one_worker,
    "one model replica": _broken_one_model_replica,
    "PodMonitor port": _broken_podmonitor_port,
    "PodMonitor kept out by the policy": _broken_podmonitor_policy,
    "dashboard metric typo": _broken_dashboard_metric,
    "dashboard without p99": _broken_dashboard_quantile,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_setups(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []


def test_blueprint_autoscaler_saw_no_neuron_cores() -> None:
    """Why the blueprint never grew past one node: without `neuron_cores` in rayStartParams,
    the autoscaler's view of an inf2 worker has CPU and memory only."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    del workers(rayservice)[0]["rayStartParams"]["resources"]
    inf2 = autoscaler_view(rayservice)["available_node_types"]["inf2"]
    assert "neuron_cores" not in inf2["resources"]
