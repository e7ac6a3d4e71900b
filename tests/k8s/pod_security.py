"""The Pod Security Standards' `restricted` profile, checked field by field on the pods the
manifests create: `RESTRICTED` has one rule per control that pod-security-admission runs for
`enforce: restricted` at the pinned version (kubernetes/pod-security-admission, `policy/check_*.go`;
the baseline controls are part of the profile). Each `Rule` carries `breaks`, a change that makes
a compliant pod violate exactly that rule, so a test can prove the rule can fail. `pods` lists
every pod a rendering creates, KubeRay's as kuberay.py builds them.

Not here: what restricted does not ask (hardening.py), the namespaces' admission labels
(test_pod_security.py), and controls of other profiles or versions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.k8s import kuberay
from tests.k8s.checks import pod_templates
from tests.k8s.kustomize import Manifest

Pod = dict[str, Any]
Check = Callable[[dict[str, Any], dict[str, Any]], list[str]]  # (metadata, spec) -> problems


@dataclass(frozen=True)
class Rule:
    """A check and a change of a compliant pod that the check must report."""

    check: Check
    breaks: Callable[[Pod], None]


RESTRICTED: dict[str, Rule] = {}


def rule(registry: dict[str, Rule], name: str, breaks: Callable[[Pod], None]) -> Any:
    def register(check: Check) -> Check:
        registry[name] = Rule(check, breaks)
        return check

    return register


def pods(objects: list[Manifest]) -> dict[str, Pod]:
    """Every pod the objects create, by "<kind>/<name>" (and "head" or "worker <group>" for a
    RayService, whose pods KubeRay builds)."""
    found: dict[str, Pod] = {}
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayService":
            found.update({f"{where} {label}": pod for label, pod in kuberay.ray_pods(obj).items()})
        else:
            for _, template in pod_templates(obj):
                found[where] = template
    return found


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Init, regular and ephemeral containers, as pod-security-admission visits them."""
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])
    yield from spec.get("ephemeralContainers", [])


def context_of(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("securityContext") or {}


def first(pod: Pod) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def set_context(pod: Pod, **fields: Any) -> None:
    first(pod).setdefault("securityContext", {}).update(fields)


# --- restricted (baseline controls included) -------------------------------------------------


@rule(RESTRICTED, "hostNamespaces", lambda pod: pod["spec"].update(hostNetwork=True))
def host_namespaces(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.hostNetwork, hostPID, hostIPC: undefined or false."""
    return [
        f"spec.{field} is true"
        for field in ("hostNetwork", "hostPID", "hostIPC")
        if spec.get(field)
    ]


@rule(RESTRICTED, "privileged", lambda pod: set_context(pod, privileged=True))
def privileged(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """securityContext.privileged of every container: undefined or false."""
    return [f"{c['name']}: privileged" for c in containers(spec) if context_of(c).get("privileged")]


@rule(
    RESTRICTED,
    "hostPathVolumes",
    lambda pod: (
        pod["spec"].setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}})
    ),
)
def host_path_volumes(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.volumes[*].hostPath: undefined."""
    return [f"volume {v['name']}: hostPath" for v in spec.get("volumes", []) if "hostPath" in v]


@rule(
    RESTRICTED,
    "hostPorts",
    lambda pod: first(pod).setdefault("ports", []).append({"containerPort": 1, "hostPort": 1}),
)
def host_ports(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """ports[*].hostPort of every container: undefined or 0."""
    return [
        f"{c['name']}: hostPort {port['hostPort']}"
        for c in containers(spec)
        for port in c.get("ports", [])
        if port.get("hostPort")
    ]


_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


@rule(
    RESTRICTED,
    "appArmorProfile",
    lambda pod: set_context(pod, appArmorProfile={"type": "Unconfined"}),
)
def app_armor_profile(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """appArmorProfile.type (pod, containers): RuntimeDefault, Localhost or undefined; the
    deprecated annotations: runtime/default, localhost/* or empty."""
    problems = [
        f"annotation {key}: {value}"
        for key, value in (metadata.get("annotations") or {}).items()
        if key.startswith(_APPARMOR_ANNOTATION)
        and value
        and value != "runtime/default"
        and not value.startswith("localhost/")
    ]
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], context_of(c)) for c in containers(spec)]
    for who, context in holders:
        kind = (context.get("appArmorProfile") or {}).get("type")
        if kind is not None and kind not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{who}: appArmorProfile {kind}")
    return problems


_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


@rule(RESTRICTED, "seLinuxOptions", lambda pod: set_context(pod, seLinuxOptions={"user": "root"}))
def se_linux_options(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """seLinuxOptions (pod, containers): type among the container types, no user, no role."""
    problems = []
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], context_of(c)) for c in containers(spec)]
    for who, context in holders:
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in _SELINUX_TYPES:
            problems.append(f"{who}: seLinuxOptions.type {options['type']}")
        problems += [
            f"{who}: seLinuxOptions.{key} set" for key in ("user", "role") if options.get(key)
        ]
    return problems


@rule(RESTRICTED, "procMount", lambda pod: set_context(pod, procMount="Unmasked"))
def proc_mount(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """securityContext.procMount of every container: undefined or Default."""
    return [
        f"{c['name']}: procMount {context_of(c)['procMount']}"
        for c in containers(spec)
        if context_of(c).get("procMount", "Default") != "Default"
    ]


# The safe sysctls of pod-security-admission up to v1.32 (`check_sysctls.go`).
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
}


@rule(
    RESTRICTED,
    "sysctls",
    lambda pod: (
        pod["spec"]
        .setdefault("securityContext", {})
        .setdefault("sysctls", [])
        .append({"name": "kernel.msgmax", "value": "1"})
    ),
)
def sysctls(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.securityContext.sysctls[*].name: the safe set only."""
    context = spec.get("securityContext") or {}
    return [
        f"sysctl {s['name']}" for s in context.get("sysctls", []) if s["name"] not in _SAFE_SYSCTLS
    ]


@rule(
    RESTRICTED,
    "windowsHostProcess",
    lambda pod: set_context(pod, windowsOptions={"hostProcess": True}),
)
def windows_host_process(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """windowsOptions.hostProcess (pod, containers): undefined or false."""
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], context_of(c)) for c in containers(spec)]
    return [
        f"{who}: windowsOptions.hostProcess"
        for who, context in holders
        if (context.get("windowsOptions") or {}).get("hostProcess")
    ]


def _probe_hosts(container: dict[str, Any]) -> Iterator[str]:
    handlers = [container.get(p) or {} for p in ("livenessProbe", "readinessProbe", "startupProbe")]
    lifecycle = container.get("lifecycle") or {}
    handlers += [lifecycle.get(h) or {} for h in ("postStart", "preStop")]
    for handler in handlers:
        for action in ("httpGet", "tcpSocket"):
            host = (handler.get(action) or {}).get("host")
            if host:
                yield f"{action}.host {host}"


@rule(
    RESTRICTED,
    "hostProbesAndHostLifecycle",
    lambda pod: first(pod).update(livenessProbe={"tcpSocket": {"port": 1, "host": "10.0.0.1"}}),
)
def host_probes_and_lifecycle(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Probes and lifecycle handlers name no host (a control from v1.34 on, met already)."""
    return [f"{c['name']}: {host}" for c in containers(spec) for host in _probe_hosts(c)]


_VOLUME_TYPES = {
    "configMap",
    "downwardAPI",
    "emptyDir",
    "projected",
    "secret",
    "csi",
    "persistentVolumeClaim",
    "ephemeral",
    "image",
}


@rule(
    RESTRICTED,
    "restrictedVolumes",
    lambda pod: (
        pod["spec"]
        .setdefault("volumes", [])
        .append({"name": "n", "nfs": {"server": "nfs.example", "path": "/"}})
    ),
)
def restricted_volumes(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.volumes[*]: only configMap, downwardAPI, emptyDir, projected, secret, csi,
    persistentVolumeClaim, ephemeral, image."""
    return [
        f"volume {v['name']}: {sorted(set(v) - {'name'})}"
        for v in spec.get("volumes", [])
        if not set(v) - {"name"} <= _VOLUME_TYPES
    ]


@rule(
    RESTRICTED,
    "allowPrivilegeEscalation",
    lambda pod: set_context(pod, allowPrivilegeEscalation=None),
)
def allow_privilege_escalation(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """securityContext.allowPrivilegeEscalation of every container: false (not undefined)."""
    return [
        f"{c['name']}: allowPrivilegeEscalation is not false"
        for c in containers(spec)
        if context_of(c).get("allowPrivilegeEscalation") is not False
    ]


def _pod_or_containers(spec: dict[str, Any], field: str, good: Callable[[Any], bool]) -> list[str]:
    """A field set on the pod covers containers that leave it unset; a bad value anywhere fails."""
    pod_value = (spec.get("securityContext") or {}).get(field)
    problems = [] if pod_value is None or good(pod_value) else [f"pod: {field} {pod_value!r}"]
    for container in containers(spec):
        value = context_of(container).get(field)
        if value is None and (pod_value is None or not good(pod_value)):
            problems.append(f"{container['name']}: no {field} on the pod or the container")
        elif value is not None and not good(value):
            problems.append(f"{container['name']}: {field} {value!r}")
    return problems


@rule(
    RESTRICTED, "runAsNonRoot", lambda pod: pod["spec"]["securityContext"].pop("runAsNonRoot", None)
)
def run_as_non_root(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """runAsNonRoot: true on the pod, or on every container; never false."""
    return _pod_or_containers(spec, "runAsNonRoot", lambda value: value is True)


@rule(RESTRICTED, "runAsUser", lambda pod: set_context(pod, runAsUser=0))
def run_as_user(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """runAsUser (pod, containers): undefined or non-zero."""
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], context_of(c)) for c in containers(spec)]
    return [f"{who}: runAsUser 0" for who, context in holders if context.get("runAsUser") == 0]


@rule(
    RESTRICTED,
    "seccompProfile",
    lambda pod: pod["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
)
def seccomp_profile(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """seccompProfile.type RuntimeDefault or Localhost on the pod, or on every container."""
    return _pod_or_containers(
        spec,
        "seccompProfile",
        lambda value: (value or {}).get("type") in {"RuntimeDefault", "Localhost"},
    )


@rule(
    RESTRICTED,
    "capabilities",
    lambda pod: set_context(pod, capabilities={"drop": ["ALL"], "add": ["NET_RAW"]}),
)
def capabilities(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """capabilities.drop of every container includes ALL; capabilities.add at most
    NET_BIND_SERVICE (this control replaces baseline's capabilities one)."""
    problems = []
    for container in containers(spec):
        caps = context_of(container).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{container['name']}: capabilities.drop lacks ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{container['name']}: capabilities.add {sorted(added)}")
    return problems
