"""Secrets: the API key and the hub token reach the containers as read-only files of required
Secret volumes, the UI's login as one of an optional volume, never as environment variables;
secret files are readable by owner and group only; only the neuron workers read the hub token; no
token, Secret or placeholder is committed under k8s/. Each check also reports a deliberately
broken copy.

Not here: the backend's and the UI's reading of the files (tests/backend, tests/chatui).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.k8s.checks import (
    API_KEY_SECRET,
    HF_SECRET,
    HF_TOKEN_ENV,
    K8S,
    KUSTOMIZATIONS,
    RAYSERVICE,
    REPO,
    UI_DEPLOYMENT,
    env_of,
    find,
    one,
    pod_templates,
    rendered,
)
from tests.k8s.kustomize import Manifest

# Secrets that must never be environment variables (they are files: *_FILE, HF_TOKEN_PATH).
FORBIDDEN_SECRET_ENV = HF_TOKEN_ENV | {"LLM_API_KEY", "CHATUI_API_KEY", "CHATUI_AUTH"}
# The UI's optional login (`user:password`): Secret chatui-auth, created by hand or not at all.
UI_AUTH_SECRET = {"name": "chatui-auth", "key": "auth"}


def secret_file(
    container: dict[str, Any],
    spec: dict[str, Any],
    secret: dict[str, str],
    optional: bool = False,
) -> str | None:
    """Path at which a container reads a Secret's key from a mounted, read-only secret volume,
    required unless `optional` (None if it does not)."""
    volumes = {v["name"]: v.get("secret") for v in spec.get("volumes", []) if "secret" in v}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"])
        if not source or source.get("secretName") != secret["name"]:
            continue
        if source.get("optional") and not optional:
            continue
        if not mount.get("readOnly") or "subPath" in mount:
            continue  # writable, or a subPath copy that never sees a rotated key
        items = {i["key"]: i["path"] for i in source.get("items", [])} or {
            secret["key"]: secret["key"]
        }
        if secret["key"] in items:
            return f"{mount['mountPath'].rstrip('/')}/{items[secret['key']]}"
    return None


def secret_problems(objects: list[Manifest]) -> list[str]:
    """Secrets reach containers as read-only files, never as environment variables: every Ray
    container reads the API key at LLM_API_KEY_FILE and the UI at CHATUI_API_KEY_FILE (from
    Secret llm-api-key, key api-key, required: a pod without it must not start open); the Hugging
    Face token only where HF_TOKEN_PATH names it (Secret hf-token, key hf-token). Init containers
    (a download) serve nothing and need no key. No Secret object is rendered."""
    problems = [f"Secret/{obj['metadata']['name']} rendered" for obj in find(objects, "Secret")]
    secrets = {API_KEY_SECRET["name"], HF_SECRET["name"], UI_AUTH_SECRET["name"]}
    wanted: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for obj in objects:
        for _, template in pod_templates(obj):
            spec = template["spec"]
            problems += mode_problems(spec)
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                env = env_of(container)
                for name, entry in env.items():
                    ref = (entry.get("valueFrom") or {}).get("secretKeyRef") or {}
                    if ref.get("name") in secrets or name in FORBIDDEN_SECRET_ENV:
                        problems.append(f"{container['name']}: {name} is an environment variable")
                token = env.get("HF_TOKEN_PATH", {}).get("value")
                if secret_file(container, spec, HF_SECRET) != token:
                    problems.append(
                        f"{container['name']}: HF_TOKEN_PATH {token!r} is not the mounted token"
                    )
            if obj["kind"] == "RayService":
                wanted += [("LLM_API_KEY_FILE", c, spec) for c in spec["containers"]]
            elif obj["kind"] == "Deployment" and obj["metadata"]["name"] == UI_DEPLOYMENT:
                wanted += [("CHATUI_API_KEY_FILE", c, spec) for c in spec["containers"]]
                for container in spec["containers"]:
                    path = env_of(container).get("CHATUI_AUTH_FILE", {}).get("value")
                    if path is None or path != secret_file(
                        container, spec, UI_AUTH_SECRET, optional=True
                    ):
                        problems.append(
                            f"{container['name']}: CHATUI_AUTH_FILE {path!r} is not the mounted "
                            "Secret chatui-auth"
                        )
    for name, container, spec in wanted:
        path = env_of(container).get(name, {}).get("value")
        if path is None or path != secret_file(container, spec, API_KEY_SECRET):
            problems.append(
                f"{container['name']}: {name} {path!r} is not the mounted Secret llm-api-key"
            )
    return problems


def mode_problems(spec: dict[str, Any]) -> list[str]:
    """Secret volumes set a mode, and no file of theirs is readable by others (the default
    0644 is); items may narrow it, never widen it."""
    problems = []
    for volume in spec.get("volumes", []):
        secret = volume.get("secret")
        if secret is None:
            continue
        modes = [secret.get("defaultMode")] + [
            i["mode"] for i in secret.get("items", []) if "mode" in i
        ]
        if modes[0] is None or any(mode & 0o007 for mode in modes if mode is not None):
            problems.append(f"secret volume {volume['name']}: mode {modes} lets others read it")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_secrets_are_read_only_files(name: str) -> None:
    """The API key as a file on every Ray pod (LLM_API_KEY_FILE) and the UI
    (CHATUI_API_KEY_FILE), from Secret llm-api-key; the UI's login at CHATUI_AUTH_FILE from the
    optional Secret chatui-auth; the hub token only where HF_TOKEN_PATH names it; no secret in an
    environment variable (CHATUI_AUTH included); no secret file readable by others."""
    assert secret_problems(rendered(name)) == []


def test_only_the_neuron_workers_read_the_hub_token() -> None:
    """The gated model is downloaded by the neuron workers' model replicas: they read the token
    from the mounted Secret at HF_TOKEN_PATH (huggingface_hub's token file); the head and the UI
    never see it, and the CPU overlays (the embedded model, a public GGUF) not at all."""
    holders = {}
    for name in KUSTOMIZATIONS:
        for obj in rendered(name):
            for label, template in pod_templates(obj):
                for container in template["spec"]["containers"]:
                    if secret_file(container, template["spec"], HF_SECRET):
                        holders.setdefault(name, set()).add(label)
    eks = {"worker inf2"}
    assert holders == {"root": eks, "mistral": eks, "monitoring": eks, "nxdi": eks}


def test_no_token_or_placeholder_in_any_file() -> None:
    """No token value, Secret object or envsubst placeholder is committed under k8s/."""
    files = [p for p in K8S.rglob("*") if p.is_file()]
    files += [REPO / "Dockerfile.serve", REPO / "Dockerfile.ui"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), path
        assert "${" not in text or path.name.startswith("Dockerfile"), path
        for doc in yaml.safe_load_all(text) if path.suffix in {".yaml", ".yml"} else []:
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path


def _rayservice(name: str = "mistral") -> Manifest:
    return one(rendered(name), "RayService", RAYSERVICE)


def _worker(rayservice: Manifest) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _ray_spec(objects: list[Manifest], group: str) -> dict[str, Any]:
    cluster = one(objects, "RayService", RAYSERVICE)["spec"]["rayClusterConfig"]
    spec = cluster["headGroupSpec"] if group == "head" else cluster["workerGroupSpecs"][0]
    return spec["template"]["spec"]


def _env(container: dict[str, Any], name: str) -> dict[str, Any]:
    [entry] = [e for e in container["env"] if e["name"] == name]
    return entry


def _broken_secret_env() -> list[str]:
    rayservice = _rayservice()
    env = _worker(rayservice)["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "HF_TOKEN", "value": "hf_not_a_real_token"})
    return secret_problems([rayservice])


def _broken_secret() -> list[str]:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}}
    return secret_problems([*rendered("mistral"), secret])


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


def _ui_spec(objects: list[Manifest]) -> dict[str, Any]:
    return one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["template"]["spec"]


def _broken_login_as_env() -> list[str]:
    """The UI as it was: CHATUI_AUTH from the Secret, as an environment variable."""
    objects = rendered("root")
    ui = _ui_spec(objects)["containers"][0]
    ref = {"secretKeyRef": {"name": "chatui-auth", "key": "auth", "optional": True}}
    ui["env"] = [e for e in ui["env"] if e["name"] != "CHATUI_AUTH_FILE"]
    ui["env"].append({"name": "CHATUI_AUTH", "valueFrom": ref})
    return secret_problems(objects)


def _broken_login_mount() -> list[str]:
    objects = rendered("root")
    ui = _ui_spec(objects)["containers"][0]
    ui["volumeMounts"] = [m for m in ui["volumeMounts"] if m["name"] != "chatui-auth"]
    return secret_problems(objects)


def _broken_login_mode() -> list[str]:
    objects = rendered("root")
    for volume in _ui_spec(objects)["volumes"]:
        if volume["name"] == "chatui-auth":
            volume["secret"]["defaultMode"] = 0o644
    return secret_problems(objects)


def _broken_login_item_mode() -> list[str]:
    objects = rendered("root")
    for volume in _ui_spec(objects)["volumes"]:
        if volume["name"] == "chatui-auth":
            volume["secret"]["items"][0]["mode"] = 0o444
    return secret_problems(objects)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "login as an environment variable": _broken_login_as_env,
    "login file not mounted": _broken_login_mount,
    "login readable by others": _broken_login_mode,
    "login item readable by others": _broken_login_item_mode,
    "hf token literal": _broken_secret_env,
    "secret object": _broken_secret,
    "key as an environment variable": _broken_key_as_env,
    "key Secret optional": _broken_key_optional,
    "key file path not the mount": _broken_key_path,
    "key missing on the head": _broken_key_missing_on_head,
    "hub token as an environment variable": _broken_hub_token_env,
    "hub token path not the mount": _broken_hub_token_path,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
