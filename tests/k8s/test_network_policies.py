"""Network policies, evaluated from the rendered NetworkPolicies and pod labels: both namespaces
deny by default; the serve port is open to the UI and Ray, Ray's ports to Ray (metrics to
Prometheus, the dashboard to the operator), 7860 to anyone; egress goes to the serve port, DNS,
the hub (workers, public HTTPS) and the Kubernetes API (head) only; each namespace's policies
refuse on their own what they must. Each check also reports a deliberately broken copy.

Not here: what a CNI does beyond networking.k8s.io/v1 (networkpolicy.py says what it models).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.k8s.checks import RAY_NAMESPACE, SERVE_PORT, UI_NAMESPACE, UI_PORT, find, rendered
from tests.k8s.cluster import (
    DNS,
    OPERATOR,
    PROMETHEUS,
    container_ports,
    namespace_labels,
    policy_spec,
    ray_pods,
    ui_pod,
)
from tests.k8s.kustomize import Manifest
from tests.k8s.networkpolicy import Endpoint, External, Pod, allowed, selects

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


@pytest.mark.parametrize("name", ["root", "monitoring", "nxdi"])
def test_network_policies_admit_exactly_what_each_side_needs(name: str) -> None:
    """The serve port for the UI and Ray, Ray's ports for Ray (metrics: Prometheus, dashboard:
    the operator), 7860 for the UI; egress to the serve port, DNS, the hub and the API only."""
    objects = rendered(name)
    assert network_problems(objects) == []
    assert default_deny_problems(objects) == []


@pytest.mark.parametrize("name", ["root", "nxdi"])
def test_every_policy_selects_pods_that_exist(name: str) -> None:
    """No policy aims at a label nothing carries (it would protect nothing)."""
    objects = rendered(name)
    pods = [pod for pod, _ in ray_pods(objects).values()] + [ui_pod(objects)[0]]
    for policy in find(objects, "NetworkPolicy"):
        namespace = policy["metadata"]["namespace"]
        assert any(
            pod.namespace == namespace and selects(policy["spec"]["podSelector"], pod.labels)
            for pod in pods
        ), policy["metadata"]["name"]


def _broken_serve_peer() -> list[str]:
    objects = rendered("root")
    # The UI namespace only, not its UI pods: any pod there reaches the API.
    del policy_spec(objects, RAY_NAMESPACE, "ray-cluster")["ingress"][1]["from"][0]["podSelector"]
    return network_problems(objects)


def _broken_internal_peer() -> list[str]:
    objects = rendered("root")
    policy_spec(objects, RAY_NAMESPACE, "ray-cluster")["ingress"][0]["from"] = []  # from anywhere
    return network_problems(objects)


def _broken_ui_egress() -> list[str]:
    objects = rendered("root")
    policy_spec(objects, UI_NAMESPACE, "chatui")["egress"][0]["ports"][0]["port"] = 8265
    return network_problems(objects)


def _broken_no_default_deny() -> list[str]:
    objects = [o for o in rendered("root") if o["metadata"]["name"] != "default-deny"]
    return default_deny_problems(objects)


def _broken_head_egress() -> list[str]:
    objects = rendered("root")
    policy_spec(objects, RAY_NAMESPACE, "ray-head-to-kubernetes-api")["egress"][0]["to"] = [
        {"ipBlock": {"cidr": "0.0.0.0/0"}}
    ]
    return network_problems(objects)


def _broken_worker_egress() -> list[str]:
    objects = rendered("root")
    egress = policy_spec(objects, RAY_NAMESPACE, "ray-workers-to-hugging-face")["egress"]
    del egress[0]["to"][0]["ipBlock"]["except"]
    return network_problems(objects)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "serve port open to the UI's whole namespace": _broken_serve_peer,
    "Ray ports open to anyone": _broken_internal_peer,
    "UI egress to the wrong port": _broken_ui_egress,
    "no default deny": _broken_no_default_deny,
    "head egress to the internet": _broken_head_egress,
    "worker egress into the network": _broken_worker_egress,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
