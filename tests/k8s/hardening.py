"""Hardening beyond the `restricted` profile, checked on every pod the manifests create: read-only
root filesystems, with a writable volume wherever a container writes (its temporary directory,
the directories its environment names, Ray's logs for the autoscaler, the UI image's home); no
service-account token but where KubeRay's autoscaler calls the API; ephemeral-storage requests and
limits; a sizeLimit on every emptyDir. Each rule carries `breaks`, as in pod_security.py.

Not here: the restricted controls (pod_security.py); what a container writes that its
environment does not name (the list is PATH_ENV's and `written_paths`').
"""

from __future__ import annotations

import re
from typing import Any

from tests.k8s import kuberay
from tests.k8s.checks import REPO
from tests.k8s.pod_security import Pod, Rule, containers, context_of, first, rule, set_context

HARDENING: dict[str, Rule] = {}


@rule(
    HARDENING, "readOnlyRootFilesystem", lambda pod: set_context(pod, readOnlyRootFilesystem=False)
)
def read_only_root_filesystem(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Every container's root filesystem is read-only: what it writes goes to volumes."""
    return [
        f"{c['name']}: root filesystem writable"
        for c in containers(spec)
        if context_of(c).get("readOnlyRootFilesystem") is not True
    ]


def _flip_token(pod: Pod) -> None:
    uses = any(c["name"] == kuberay.AUTOSCALER for c in pod["spec"]["containers"])
    pod["spec"]["automountServiceAccountToken"] = not uses


@rule(HARDENING, "serviceAccountToken", _flip_token)
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


@rule(
    HARDENING,
    "ephemeralStorage",
    lambda pod: first(pod)["resources"]["limits"].pop("ephemeral-storage", None),
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


@rule(HARDENING, "emptyDirSizeLimit", lambda pod: _empty_dir(pod).pop("sizeLimit", None))
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


@rule(HARDENING, "writablePaths", lambda pod: first(pod).update(volumeMounts=[]))
def writable_paths(metadata: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """What each container writes lies in a writable volume (its root filesystem is read-only)."""
    return [
        f"{c['name']}: {path} is not on a writable volume"
        for c in containers(spec)
        for path in sorted(written_paths(c))
        if not writable(c, spec, path)
    ]
