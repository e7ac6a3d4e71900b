"""The UI's Deployment and Service: names, port 7860, the backend URL, bind address, probes on
GET /healthz, non-root, resources, no code in a ConfigMap, and CHATUI_* variables that are
ChatUISettings fields. Each check also reports a deliberately broken copy.

Not here: its network policy (test_network_policies.py), replicas and budget
(test_disruption.py), pod security (test_pod_security.py), image (test_images.py).
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.checks import (
    BACKEND_URL,
    UI_DEPLOYMENT,
    UI_NAMESPACE,
    UI_PORT,
    UI_SERVICE,
    env_of,
    find,
    one,
    rendered,
    ui_container,
)
from tests.k8s.kustomize import Manifest

UI_HEALTH_PATH = "/healthz"


def ui_settings_problems(container: dict[str, Any]) -> list[str]:
    """CHATUI_* variables must name ChatUISettings fields, and their values must validate."""
    settings = importlib.import_module("chatui.settings")
    fields = settings.ChatUISettings.model_fields
    prefix = settings.ENV_PREFIX
    values = {}
    problems = []
    for name, entry in env_of(container).items():
        if not name.startswith(prefix):
            continue
        field = name.removeprefix(prefix).lower()
        if field not in fields:
            problems.append(f"{name}: not a field of ChatUISettings")
        elif "value" in entry:
            values[field] = entry["value"]
    with tempfile.TemporaryDirectory() as mounts:
        # A `*_FILE` setting names a mounted Secret, which is not here: a stand-in file is (the
        # login's in its `user:password` form).
        for field in [f for f in values if f.endswith("_file")]:
            stand_in = Path(mounts) / field
            stand_in.write_text("stand-in:secret\n" if field == "auth_file" else "stand-in\n")
            values[field] = str(stand_in)
        try:
            settings.ChatUISettings(**values)
        except ValueError as exc:
            problems.append(f"UI env: {exc}")
    return problems


def ui_problems(objects: list[Manifest]) -> list[str]:
    """The UI's names, port, backend URL, bind address, probes (GET /healthz), security and
    resources."""
    problems = []
    deployment = one(objects, "Deployment", UI_DEPLOYMENT)
    service = one(objects, "Service", UI_SERVICE)
    for obj in (deployment, service):
        if obj["metadata"].get("namespace") != UI_NAMESPACE:
            problems.append(f"{obj['kind']} not in namespace {UI_NAMESPACE}")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    spec = service["spec"]
    if spec.get("type", "ClusterIP") != "ClusterIP":
        problems.append("gradio-service is not ClusterIP")
    (port,) = spec["ports"]
    target = port.get("targetPort", port["port"])
    if port["port"] != UI_PORT or ports.get(target, target) != UI_PORT:
        problems.append(f"gradio-service does not map {UI_PORT} to the container's {UI_PORT}")
    labels = template["metadata"].get("labels", {})
    if not spec["selector"] or spec["selector"].items() - labels.items():
        problems.append("gradio-service selector does not select the UI pods")
    env = {name: entry.get("value") for name, entry in env_of(container).items()}
    if env.get("CHATUI_BACKEND_URL") != BACKEND_URL:
        problems.append(f"CHATUI_BACKEND_URL is {env.get('CHATUI_BACKEND_URL')!r}")
    if env.get("CHATUI_HOST") != "0.0.0.0":
        problems.append("CHATUI_HOST is not 0.0.0.0")
    # The UI's /healthz answers without rendering the page (no auth, no Blocks); `/` would
    # build the whole page on every probe.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe not in container and probe == "startupProbe":
            continue
        http = container.get(probe, {}).get("httpGet", {})
        path, port = http.get("path"), ports.get(http.get("port"), http.get("port"))
        if path != UI_HEALTH_PATH or port != UI_PORT:
            problems.append(f"{probe} is not HTTP GET {UI_HEALTH_PATH} on {UI_PORT} (it is {path})")
    if template["spec"].get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append("UI pod does not set runAsNonRoot")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(kind, {})):
            problems.append(f"UI container lacks cpu/memory {kind}")
    if find(objects, "ConfigMap"):
        problems.append("ConfigMap rendered (the UI ships in its image)")
    return problems


@pytest.mark.parametrize("name", ["root", "gradio", "cpu", "cpu-mistral-gguf", "nxdi"])
def test_ui_contract(name: str) -> None:
    """UI names, port 7860, backend URL, 0.0.0.0, HTTP probes, non-root, resources, no code map."""
    assert ui_problems(rendered(name)) == []


def test_ui_env_is_chatui_settings() -> None:
    """Every CHATUI_* variable of the Deployment is a ChatUISettings field and validates."""
    pytest.importorskip("chatui.settings")
    assert ui_settings_problems(ui_container(rendered("gradio"))) == []


def _broken_ui() -> list[str]:
    objects = rendered("gradio")
    env_of(ui_container(objects))["CHATUI_HOST"]["value"] = "127.0.0.1"
    return ui_problems(objects)


def _broken_ui_settings() -> list[str]:
    pytest.importorskip("chatui.settings")
    container = ui_container(rendered("gradio"))
    container["env"].append({"name": "CHATUI_BACKEND_TIMEOUT", "value": "5"})
    return ui_settings_problems(container)


def _broken_ui_service() -> list[str]:
    objects = rendered("gradio")
    one(objects, "Service", UI_SERVICE)["spec"]["ports"][0]["targetPort"] = 8080
    return ui_problems(objects)


def _broken_ui_probe() -> list[str]:
    objects = rendered("gradio")
    ui_container(objects)["livenessProbe"]["httpGet"]["path"] = "/"
    return ui_problems(objects)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "UI probe renders the page": _broken_ui_probe,
    "ui bind address": _broken_ui,
    "ui service port": _broken_ui_service,
    "ui env not a setting": _broken_ui_settings,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
