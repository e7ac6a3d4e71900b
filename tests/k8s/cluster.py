"""The pods and namespaces a rendered kustomization puts in a cluster, as label selectors (of
NetworkPolicies, PodDisruptionBudgets, PodMonitors) see them: the Ray pods KubeRay creates (their
labels: networkpolicy.ray_pod), the UI's pod, named container ports, the namespaces' labels, and
stand-ins for the cluster's other pods (DNS, Prometheus, the KubeRay operator).

Not here: the pods' full specs as KubeRay builds them (kuberay.py), and NetworkPolicy semantics
(networkpolicy.py).
"""

from __future__ import annotations

from typing import Any

from tests.k8s.checks import (
    RAY_NAMESPACE,
    RAYSERVICE,
    UI_DEPLOYMENT,
    UI_NAMESPACE,
    find,
    one,
    pod_templates,
)
from tests.k8s.kustomize import Manifest
from tests.k8s.networkpolicy import Pod, ray_pod

MONITORING_NAMESPACE = "monitoring"
OPERATOR_NAMESPACE = "kuberay-operator"


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


DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
PROMETHEUS = Pod(MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"})
OPERATOR = Pod(OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "kuberay-operator"})


def policy_spec(objects: list[Manifest], namespace: str, name: str) -> dict[str, Any]:
    """The spec of one NetworkPolicy."""
    [found] = [
        p for p in find(objects, "NetworkPolicy", name) if p["metadata"]["namespace"] == namespace
    ]
    return found["spec"]
