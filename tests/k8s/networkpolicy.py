"""A small evaluator of Kubernetes NetworkPolicy semantics, to check offline who may talk to whom.

It follows the rules of networking.k8s.io/v1: a pod is isolated for a direction once a policy
of its namespace selects it with that policy type; an isolated pod accepts a connection when any
rule of any such policy matches the peer and the port; a connection needs both the source's
egress and the destination's ingress. Peers outside the cluster are `External` addresses.
Named ports are refused (our policies use numbers), so nothing is silently misread.

Not covered: what depends on the network plugin (whether pod addresses match `ipBlock`s, taken as
yes; Service addresses translated before or after evaluation; traffic from the node, which is
always allowed), replies (connections are judged at their opening) and anything beyond
networking.k8s.io/v1 (Cilium's or Calico's own policies).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.k8s.kustomize import Manifest

Direction = Literal["Ingress", "Egress"]
# Labels KubeRay puts on every Ray pod; template labels override all but the three it keeps
# (ray-operator/controllers/ray/common/pod.go, labelPod).
_KUBERAY_FIXED = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")


@dataclass(frozen=True)
class Pod:
    """A pod: its namespace, labels and an address in the pod network."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = "10.1.2.3"


@dataclass(frozen=True)
class External:
    """An address outside the pod network (the Hugging Face hub, the Kubernetes API)."""

    ip: str


Endpoint = Pod | External


def ray_pod(
    template: dict[str, Any], namespace: str, node_type: str, group: str, cluster: str
) -> Pod:
    """The pod KubeRay creates from a group's template: its labels plus KubeRay's."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels.update(template["metadata"].get("labels", {}))
    labels.update(dict(zip(_KUBERAY_FIXED, (node_type, group, cluster), strict=True)))
    return Pod(namespace=namespace, labels=labels)


def selects(selector: dict[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def policy_types(policy: Manifest) -> list[str]:
    """spec.policyTypes, or the API server's default for a policy that omits it."""
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        number = entry["port"]
        if not isinstance(number, int):
            raise ValueError(f"named port {number!r}: the evaluator takes numbers only")
        if number <= port <= entry.get("endPort", number):
            return True
    return False


def _in_block(block: dict[str, Any], ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if address not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))


def _peer_matches(
    peer: dict[str, Any],
    policy_namespace: str,
    namespaces: Mapping[str, Mapping[str, str]],
    endpoint: Endpoint,
) -> bool:
    if "ipBlock" in peer:
        # Whether pod addresses match ipBlocks depends on the plugin: assume they do (the
        # permissive reading, the safe one when checking that something is denied).
        return _in_block(peer["ipBlock"], endpoint.ip)
    if not isinstance(endpoint, Pod):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespaces[endpoint.namespace]):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), endpoint.labels)


def _direction_allows(
    policies: list[Manifest],
    namespaces: Mapping[str, Mapping[str, str]],
    subject: Endpoint,
    peer: Endpoint,
    port: int,
    protocol: str,
    direction: Direction,
) -> bool:
    if not isinstance(subject, Pod):
        return True  # outside the cluster: no policy of ours applies
    applicable = [
        policy
        for policy in policies
        if policy["metadata"]["namespace"] == subject.namespace
        and selects(policy["spec"]["podSelector"], subject.labels)
        and direction in policy_types(policy)
    ]
    if not applicable:
        return True  # not isolated
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in applicable:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key) or []
            if _port_matches(rule.get("ports"), port, protocol) and (
                not peers
                or any(
                    _peer_matches(p, policy["metadata"]["namespace"], namespaces, peer)
                    for p in peers
                )
            ):
                return True
    return False


def allowed(
    policies: list[Manifest],
    namespaces: Mapping[str, Mapping[str, str]],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether `source` may open a connection to `destination` on `port`."""
    return _direction_allows(
        policies, namespaces, source, destination, port, protocol, "Egress"
    ) and _direction_allows(policies, namespaces, destination, source, port, protocol, "Ingress")
