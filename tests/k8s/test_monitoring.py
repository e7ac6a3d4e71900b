"""Monitoring: the optional component adds only a PodMonitor, which scrapes every Ray pod on its
metrics port through the network policy; the Grafana dashboard queries only metrics the backend
exports, with the views the issue asks for. Each check also reports a deliberately broken copy.

Not here: the metrics a running backend serves (tests/e2e), the PodMonitor CRD's full schema
(its fields are checked against the operator's API reference).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.k8s import dashboard
from tests.k8s.checks import RAY_NAMESPACE, find, one, rendered
from tests.k8s.cluster import PROMETHEUS, container_ports, namespace_labels, policy_spec, ray_pods
from tests.k8s.kustomize import Manifest
from tests.k8s.networkpolicy import allowed, selects

# PodMonitor spec fields (monitoring.coreos.com/v1, prometheus-operator API reference).
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


def _broken_podmonitor_port() -> list[str]:
    objects = rendered("monitoring")
    one(objects, "PodMonitor", "ray")["spec"]["podMetricsEndpoints"][0]["port"] = "prometheus"
    return podmonitor_problems(objects)


def _broken_podmonitor_policy() -> list[str]:
    objects = rendered("monitoring")
    ingress = policy_spec(objects, RAY_NAMESPACE, "ray-cluster")["ingress"]
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
    "PodMonitor port": _broken_podmonitor_port,
    "PodMonitor kept out by the policy": _broken_podmonitor_policy,
    "dashboard metric typo": _broken_dashboard_metric,
    "dashboard without p99": _broken_dashboard_quantile,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
