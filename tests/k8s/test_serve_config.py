"""The Serve config (serveConfigV2): written once, in the base's RayService, the overlays replacing
only their parts of it; what Ray Serve's ServeDeploySchema accepts, with no key Serve would ignore
and no key twice; one application, the backend's builder, whose args are BackendSettings fields
Ray Serve can build; no `dtype` for the neuron engine, which always compiles in bf16. Each check
also reports a deliberately broken copy.

Not here: what the config asks of the cluster, replicas and their placement (test_autoscaling.py),
and the other overlay changes (test_rayservice.py, test_gguf.py).
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tests.k8s.checks import (
    K8S,
    KUSTOMIZATIONS,
    RAY_KUSTOMIZATIONS,
    RAYSERVICE,
    app_args,
    one,
    rendered,
    serve_config,
)
from tests.k8s.kustomize import Manifest, render

# The base's serveConfigV2 is split at these lines, and each overlay's `replacements` (with this
# `options.delimiter`) set the parts after them: the application's args, then its deployments.
PART_DELIMITER = "# --8<--\n"
PARTS = ("args", "deployments")
BASE = K8S / "mistral" / "rayservice.yaml"
# What only a whole serve config holds: a file with one of these is a second copy.
COMMON_KEYS = ("proxy_location", "http_options", "import_path")


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


def base_serve_config() -> str:
    """serveConfigV2 as the base's file writes it."""
    [rayservice] = [doc for doc in yaml.safe_load_all(BASE.read_text()) if doc]
    return rayservice["spec"]["serveConfigV2"]


def own_parts(directory: Path) -> dict[str, str]:
    """The parts a kustomization writes itself: its serve-<part>.yaml files, by part."""
    files = {name: directory / f"serve-{name}.yaml" for name in PARTS}
    return {name: path.read_text() for name, path in files.items() if path.is_file()}


def parts_problems(rayservice: Manifest, own: dict[str, str]) -> list[str]:
    """The serve config is the base's with at most its parts replaced: the base's text up to the
    first delimiter line, then one part per PARTS entry, each a YAML mapping of that one key, and
    the kustomization's `own` parts where it writes them."""
    head, *parts = rayservice["spec"]["serveConfigV2"].split(PART_DELIMITER)
    problems = []
    if head != base_serve_config().split(PART_DELIMITER)[0]:
        problems.append("the text before the first part is not the base's")
    if len(parts) != len(PARTS):
        problems.append(f"{len(parts)} parts after {PART_DELIMITER!r} lines, not {len(PARTS)}")
    for number, (part, name) in enumerate(zip(parts, PARTS, strict=False), 1):
        try:
            keys = list(yaml.safe_load(part) or {})
        except yaml.YAMLError as exc:
            keys = [f"unparsable ({exc})"]
        if keys != [name]:
            problems.append(f"part {number} holds {keys}, not [{name!r}]")
        if name in own and part != own[name]:
            problems.append(f"part {number} is not the kustomization's serve-{name}.yaml")
    return problems


def copies_problems(files: dict[Path, str]) -> list[str]:
    """No YAML file but the base's RayService writes what only a whole serve config holds."""
    return [
        f"{path.relative_to(K8S)}: {word}"
        for path, text in sorted(files.items())
        if path != BASE
        for word in COMMON_KEYS
        if word in text
    ]


def k8s_yaml_files() -> dict[Path, str]:
    """Every YAML file under k8s/, by path."""
    return {path: path.read_text() for path in sorted(K8S.rglob("*.yaml"))}


def neuron_dtype_problems(rayservice: Manifest) -> list[str]:
    """The neuron engine always compiles in bf16 (backend/engines/neuron.py) and LLM_DTYPE is the
    hf engine's: a neuron serve config that sets `dtype` says what does not happen."""
    args = app_args(rayservice)
    if args.get("engine") == "neuron" and "dtype" in args:
        return [f"engine neuron with dtype {args['dtype']!r}, which it ignores"]
    return []


def test_serve_config_is_written_once() -> None:
    """The base's RayService holds the one whole serve config, with its parts marked; the
    overlays hold only parts, each in the serve-<part>.yaml file of its name."""
    assert copies_problems(k8s_yaml_files()) == []
    assert len(base_serve_config().split(PART_DELIMITER)) == len(PARTS) + 1
    names = {path.name for path in K8S.rglob("serve-*.yaml")}
    assert names and names <= {f"serve-{name}.yaml" for name in PARTS}


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_overlays_change_only_their_parts_of_the_serve_config(name: str) -> None:
    """The rendered serve config is the base's up to its first part; each part is one key, and
    an overlay's own parts are its files."""
    rayservice = one(rendered(name), "RayService", RAYSERVICE)
    assert parts_problems(rayservice, own_parts(KUSTOMIZATIONS[name])) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_serve_config_is_a_valid_serve_deploy_schema(name: str) -> None:
    """serveConfigV2 is what `serve deploy` accepts, with no key Serve would ignore."""
    assert serve_config_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_serve_application_is_the_backend(name: str) -> None:
    """One application at `/` whose import path resolves to a callable."""
    (application,) = serve_config(one(rendered(name), "RayService", RAYSERVICE))["applications"]
    assert application["route_prefix"] == "/"
    assert application["import_path"] == "backend.deployments:build_app"
    assert import_path_problems(application["import_path"]) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_serve_args_are_backend_settings(name: str) -> None:
    """Every `args` key is a BackendSettings field, and together they validate."""
    assert settings_problems(app_args(one(rendered(name), "RayService", RAYSERVICE))) == []


@pytest.mark.parametrize("name", ["mistral", "cpu", "cpu-mistral-gguf", "nxdi"])
def test_ray_serve_can_build_the_application(name: str) -> None:
    """Ray Serve's own builder call turns import_path + args into an Application."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    (application,) = serve_config(one(rendered(name), "RayService", RAYSERVICE))["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    app = call_user_app_builder_with_args_if_necessary(builder, application["args"])
    assert isinstance(app, serve.Application)


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_neuron_engine_sets_no_dtype(name: str) -> None:
    """No neuron-engine serve config sets `dtype` (the engine compiles in bf16 whatever it says)."""
    assert neuron_dtype_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


def _rayservice(name: str = "mistral") -> Manifest:
    return one(rendered(name), "RayService", RAYSERVICE)


def _edit_serve_config(rayservice: Manifest, edit: Callable[[dict[str, Any]], None]) -> Manifest:
    config = serve_config(rayservice)
    edit(config)
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return rayservice


def _broken_serve_config() -> list[str]:
    def edit(config: dict[str, Any]) -> None:
        config["applications"][0]["deployments"] = [{"name": "model", "num_replica": 2}]

    return serve_config_problems(_edit_serve_config(_rayservice(), edit))


def _broken_args() -> list[str]:
    return settings_problems({**app_args(_rayservice()), "neuron_cores": 2})


def _broken_import_path() -> list[str]:
    return import_path_problems("backend.deployments:no_such_builder")


def _missed_delimiter(overlay: str, replacement: int) -> tuple[Manifest, dict[str, str]]:
    """An overlay rendered with one replacement's delimiter mistyped, and its own parts. The
    string lacks that delimiter, so kustomize appends the part (`setFieldValue`, an index past
    the end): a gguf's args come after the deployments, a second `args`; the CPU overlay's args
    too, but its next replacement then overwrites them with its deployments, leaving the base's."""
    with tempfile.TemporaryDirectory() as temporary:
        tree = Path(temporary) / "k8s"
        shutil.copytree(K8S, tree)
        path = tree / "overlays" / overlay / "kustomization.yaml"
        spec = yaml.safe_load(path.read_text())
        spec["replacements"][replacement]["targets"][0]["options"]["delimiter"] = "# -- 8< --\n"
        path.write_text(yaml.safe_dump(spec))
        rayservice = one(render(tree / "overlays" / overlay), "RayService", RAYSERVICE)
        return rayservice, own_parts(path.parent)


def _broken_neuron_dtype() -> list[str]:
    def edit(config: dict[str, Any]) -> None:
        config["applications"][0]["args"]["dtype"] = "bfloat16"

    return neuron_dtype_problems(_edit_serve_config(_rayservice(), edit))


def _broken_copy() -> list[str]:
    """overlays/cpu as it was: its own whole serve config in a JSON 6902 patch."""
    files = k8s_yaml_files()
    patch = K8S / "overlays" / "cpu" / "rayservice-cpu.yaml"
    operation = {"op": "replace", "path": "/spec/serveConfigV2", "value": base_serve_config()}
    files[patch] = yaml.safe_dump([operation]) + files[patch]
    return copies_problems(files)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "serve config unknown key": _broken_serve_config,
    "serve config key twice": lambda: serve_config_problems(
        _missed_delimiter("cpu-mistral-gguf", 0)[0]
    ),
    "overlay part not in place": lambda: parts_problems(*_missed_delimiter("cpu", 0)),
    "serve config copied into an overlay": _broken_copy,
    "args not a setting": _broken_args,
    "import path": _broken_import_path,
    "neuron engine with a dtype": _broken_neuron_dtype,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
