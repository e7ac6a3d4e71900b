"""The Pod Security Standards' `restricted` profile, checked field by field on the pods the
manifests create, and the hardening the manifests add beyond it.

`RESTRICTED` has one function per control that pod-security-admission runs for
`enforce: restricted` at the pinned version (kubernetes/pod-security-admission, `policy/check_*.go`;
the baseline controls are part of the profile). `HARDENING` holds what restricted does not ask:
read-only root filesystems with writable volumes where the processes write, no
service-account token where nothing calls the API, ephemeral-storage requests and limits,
sized emptyDirs. Each rule carries `breaks`, a change that makes a compliant pod violate exactly
that rule, so a test can prove the rule can fail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.k8s import kuberay
from tests.k8s.checks import REPO, pod_templates
from tests.k8s.kustomize import Manifest

Pod = dict[str, Any]
Check = Callable[[dict[str, Any], dict[str, Any]], list[str]]  # (metadata, spec) -> problems


@dataclass(frozen=True)
class Rule:
    """A check and a change of a compliant pod that the check must report."""

    check: Check
    breaks: Callable[[Pod], None]


RESTRICTED: dict[str, Rule] = {}
HARDENING: dict[str, Rule] = {}


def _rule(registry: dict[str, Rule], name: str, breaks: Callable[[Pod], None]) -> Any:
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


def _context(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("securityContext") or {}


def _first(pod: Pod) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def _set(pod: Pod, **fields: Any) -> None:
    _first(pod).setdefault("securityContext", {}).update(fields)


# --- restricted (baseline controls included) -------------------------------------------------


@_rule(RESTRICTED, "hostNamespaces", lambda pod: pod["spec"].update(hostNetwork=True))
def host_namespaces(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.hostNetwork, hostPID, hostIPC: undefined or false."""
    return [
        f"spec.{field} is true"
        for field in ("hostNetwork", "hostPID", "hostIPC")
        if spec.get(field)
    ]


@_rule(RESTRICTED, "privileged", lambda pod: _set(pod, privileged=True))
def privileged(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """securityContext.privileged of every container: undefined or false."""
    return [f"{c['name']}: privileged" for c in containers(spec) if _context(c).get("privileged")]


@_rule(
    RESTRICTED,
    "hostPathVolumes",
    lambda pod: (
        pod["spec"].setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}})
    ),
)
def host_path_volumes(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.volumes[*].hostPath: undefined."""
    return [f"volume {v['name']}: hostPath" for v in spec.get("volumes", []) if "hostPath" in v]


@_rule(
    RESTRICTED,
    "hostPorts",
    lambda pod: _first(pod).setdefault("ports", []).append({"containerPort": 1, "hostPort": 1}),
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


@_rule(RESTRICTED, "appArmorProfile", lambda pod: _set(pod, appArmorProfile={"type": "Unconfined"}))
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
    holders += [(c["name"], _context(c)) for c in containers(spec)]
    for who, context in holders:
        kind = (context.get("appArmorProfile") or {}).get("type")
        if kind is not None and kind not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{who}: appArmorProfile {kind}")
    return problems


_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


@_rule(RESTRICTED, "seLinuxOptions", lambda pod: _set(pod, seLinuxOptions={"user": "root"}))
def se_linux_options(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """seLinuxOptions (pod, containers): type among the container types, no user, no role."""
    problems = []
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], _context(c)) for c in containers(spec)]
    for who, context in holders:
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in _SELINUX_TYPES:
            problems.append(f"{who}: seLinuxOptions.type {options['type']}")
        problems += [
            f"{who}: seLinuxOptions.{key} set" for key in ("user", "role") if options.get(key)
        ]
    return problems


@_rule(RESTRICTED, "procMount", lambda pod: _set(pod, procMount="Unmasked"))
def proc_mount(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """securityContext.procMount of every container: undefined or Default."""
    return [
        f"{c['name']}: procMount {_context(c)['procMount']}"
        for c in containers(spec)
        if _context(c).get("procMount", "Default") != "Default"
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


@_rule(
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


@_rule(
    RESTRICTED, "windowsHostProcess", lambda pod: _set(pod, windowsOptions={"hostProcess": True})
)
def windows_host_process(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """windowsOptions.hostProcess (pod, containers): undefined or false."""
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], _context(c)) for c in containers(spec)]
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


@_rule(
    RESTRICTED,
    "hostProbesAndHostLifecycle",
    lambda pod: _first(pod).update(livenessProbe={"tcpSocket": {"port": 1, "host": "10.0.0.1"}}),
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


@_rule(
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


@_rule(RESTRICTED, "allowPrivilegeEscalation", lambda pod: _set(pod, allowPrivilegeEscalation=None))
def allow_privilege_escalation(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """securityContext.allowPrivilegeEscalation of every container: false (not undefined)."""
    return [
        f"{c['name']}: allowPrivilegeEscalation is not false"
        for c in containers(spec)
        if _context(c).get("allowPrivilegeEscalation") is not False
    ]


def _pod_or_containers(spec: dict[str, Any], field: str, good: Callable[[Any], bool]) -> list[str]:
    """A field set on the pod covers containers that leave it unset; a bad value anywhere fails."""
    pod_value = (spec.get("securityContext") or {}).get(field)
    problems = [] if pod_value is None or good(pod_value) else [f"pod: {field} {pod_value!r}"]
    for container in containers(spec):
        value = _context(container).get(field)
        if value is None and (pod_value is None or not good(pod_value)):
            problems.append(f"{container['name']}: no {field} on the pod or the container")
        elif value is not None and not good(value):
            problems.append(f"{container['name']}: {field} {value!r}")
    return problems


@_rule(
    RESTRICTED, "runAsNonRoot", lambda pod: pod["spec"]["securityContext"].pop("runAsNonRoot", None)
)
def run_as_non_root(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """runAsNonRoot: true on the pod, or on every container; never false."""
    return _pod_or_containers(spec, "runAsNonRoot", lambda value: value is True)


@_rule(RESTRICTED, "runAsUser", lambda pod: _set(pod, runAsUser=0))
def run_as_user(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """runAsUser (pod, containers): undefined or non-zero."""
    holders = [("pod", spec.get("securityContext") or {})]
    holders += [(c["name"], _context(c)) for c in containers(spec)]
    return [f"{who}: runAsUser 0" for who, context in holders if context.get("runAsUser") == 0]


@_rule(
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


@_rule(
    RESTRICTED,
    "capabilities",
    lambda pod: _set(pod, capabilities={"drop": ["ALL"], "add": ["NET_RAW"]}),
)
def capabilities(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """capabilities.drop of every container includes ALL; capabilities.add at most
    NET_BIND_SERVICE (this control replaces baseline's capabilities one)."""
    problems = []
    for container in containers(spec):
        caps = _context(container).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{container['name']}: capabilities.drop lacks ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{container['name']}: capabilities.add {sorted(added)}")
    return problems


# --- hardening beyond restricted ---------------------------------------------------------------


@_rule(HARDENING, "readOnlyRootFilesystem", lambda pod: _set(pod, readOnlyRootFilesystem=False))
def read_only_root_filesystem(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Every container's root filesystem is read-only: what it writes goes to volumes."""
    return [
        f"{c['name']}: root filesystem writable"
        for c in containers(spec)
        if _context(c).get("readOnlyRootFilesystem") is not True
    ]


def _flip_token(pod: Pod) -> None:
    uses = any(c["name"] == kuberay.AUTOSCALER for c in pod["spec"]["containers"])
    pod["spec"]["automountServiceAccountToken"] = not uses


@_rule(HARDENING, "serviceAccountToken", _flip_token)
def service_account_token(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """No service-account token unless the pod runs KubeRay's autoscaler, which calls the API
    (and then the token must be there)."""
    mounted = spec.get("automountServiceAccountToken", True)
    uses = any(c["name"] == kuberay.AUTOSCALER for c in spec["containers"])
    if uses and not mounted:
        return ["the autoscaler needs the service-account token"]
    if mounted and not uses:
        return ["service-account token mounted, but nothing here calls the API"]
    return []


@_rule(
    HARDENING,
    "ephemeralStorage",
    lambda pod: _first(pod)["resources"]["limits"].pop("ephemeral-storage", None),
)
def ephemeral_storage(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """ephemeral-storage requests and limits on every container but KubeRay's wait-gcs-ready
    (KubeRay fixes its resources): logs, spill and temporary files are bounded."""
    problems = []
    for container in containers(spec):
        if container["name"] == kuberay.WAIT_GCS_READY:
            continue
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            if "ephemeral-storage" not in (resources.get(kind) or {}):
                problems.append(f"{container['name']}: no ephemeral-storage {kind}")
    return problems


def _empty_dir(pod: Pod) -> dict[str, Any]:
    return next(v for v in pod["spec"]["volumes"] if "emptyDir" in v)["emptyDir"]


@_rule(HARDENING, "emptyDirSizeLimit", lambda pod: _empty_dir(pod).pop("sizeLimit", None))
def empty_dir_size_limit(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Every emptyDir has a sizeLimit (KubeRay's ray-logs too: the head template declares it)."""
    return [
        f"emptyDir {v['name']}: no sizeLimit"
        for v in spec.get("volumes", [])
        if "emptyDir" in v and "sizeLimit" not in (v["emptyDir"] or {})
    ]


# Environment variables naming directories the processes write: caches, temporary files.
PATH_ENV = (
    "TMPDIR",
    "HF_HOME",
    "NEURON_COMPILE_CACHE_URL",
    "GRADIO_TEMP_DIR",
    "XDG_CACHE_HOME",
    "GGUF_DIR",
)
_WRITABLE_SOURCES = ("emptyDir", "persistentVolumeClaim", "ephemeral")


def image_home(dockerfile: str) -> str | None:
    """The home directory a Dockerfile's `useradd --home-dir` creates (Gradio writes there)."""
    match = re.search(r"--home-dir\s+(\S+)", (REPO / dockerfile).read_text())
    return match.group(1) if match else None


def written_paths(container: dict[str, Any]) -> set[str]:
    """Directories a container's processes write: Python's and Ray's temporary directory
    (/tmp: Ray's session, logs and spilled objects, the Neuron compiler's work directories), the
    directories its environment names, Ray's log directory for the autoscaler, and the UI image's
    home (Gradio's caches)."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    paths = {env.get("TMPDIR") or "/tmp"}
    paths |= {env[name] for name in PATH_ENV if env.get(name)}
    if container["name"] == kuberay.AUTOSCALER:
        paths.add(kuberay.RAY_LOGS_PATH)
    if "mistral-inf2-chat-ui" in container.get("image", ""):
        paths.add(image_home("Dockerfile.ui") or "/")
    return paths


def writable(container: dict[str, Any], spec: dict[str, Any], path: str) -> bool:
    """Whether `path` lies in a writable volume (emptyDir or claim) the container mounts."""
    sources = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = sources.get(mount["name"], {})
        inside = path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/")
        if inside and not mount.get("readOnly") and any(s in volume for s in _WRITABLE_SOURCES):
            return True
    return False


@_rule(HARDENING, "writablePaths", lambda pod: _first(pod).update(volumeMounts=[]))
def writable_paths(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """What each container writes lies in a writable volume (its root filesystem is read-only)."""
    return [
        f"{c['name']}: {path} is not on a writable volume"
        for c in containers(spec)
        for path in sorted(written_paths(c))
        if not writable(c, spec, path)
    ]
