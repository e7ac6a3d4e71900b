"""Render the kustomizations under k8s/: with `kubectl kustomize` when it is installed, otherwise
with a small pure-Python renderer of the kustomize features k8s/ uses, in kustomize's order.

Covered (kustomize v4.4 and newer; kubernetes-sigs/kustomize api/internal/target/kusttarget.go):
- `resources`: files and kustomization directories; `components`: directories holding a
  `kind: Component`, whose edits apply to all the including kustomization has gathered;
- `configMapGenerator`: `name`, `files` (`path` or `key=path`, read verbatim: api/kv/kv.go) and
  `options` `annotations`, `labels`, `disableNameSuffixHash`, for a ConfigMap that is never
  emitted (`config.kubernetes.io/local-config`) or whose name hash is disabled;
- `patches` (JSON 6902 operation lists from `path` or inline `patch`, selected by `target`),
  `images` and inline `replacements`, as tests/k8s/kustomize_edits.py describes;
- objects annotated `config.kubernetes.io/local-config` (other than "false") are dropped from
  the final result only, so an overlay still reads its bases' (`makeCustomizedResMap` calls
  `IgnoreLocal` last, on the top-level build; bases are gathered by `AccumulateTarget`).
The order within a kustomization (`accumulateTarget`, `configureBuiltinTransformers`): resources,
generators, components, then patches, images, replacements.

Not covered: any other kustomization field (namespace, name prefix or suffix, labels,
strategic-merge patches, replicas, secretGenerator, generatorOptions, helm, vars, remote bases),
a ConfigMap generator's `literals`, `envs`, `behavior` or hashed name, and generators beside
components in one kustomization (kustomize before v5.1 ran the components first). Each raises
`UnsupportedKustomization`, so the two renderers cannot silently disagree; a test compares them
whenever kubectl is present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.kustomize_edits import (
    Manifest,
    UnsupportedKustomization,
    apply_json6902,
    matches,
    replace,
    set_image,
)

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
LOCAL_CONFIG = "config.kubernetes.io/local-config"
_SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "patches",
    "images",
    "replacements",
}
_TARGET_KEYS = {"group", "version", "kind", "name", "namespace"}
__all__ = ["Manifest", "UnsupportedKustomization", "local_config", "render", "render_python"]


def kubectl() -> str | None:
    """Path of a kubectl with the `kustomize` subcommand, or None."""
    return shutil.which("kubectl")


def render(directory: Path) -> list[Manifest]:
    """The objects a kustomization builds: kubectl's rendering if available, else ours."""
    return render_kubectl(directory) if kubectl() else render_python(directory)


def render_kubectl(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIRECTORY`, parsed."""
    tool = kubectl()
    if tool is None:
        raise FileNotFoundError("kubectl is not installed")
    result = subprocess.run(
        [tool, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_python(directory: Path) -> list[Manifest]:
    """Our rendering of the supported subset."""
    return [obj for obj in _build(directory, []) if not local_config(obj)]


def local_config(obj: Manifest) -> bool:
    """Whether kustomize leaves the object out of its output (kept while building)."""
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return LOCAL_CONFIG in annotations and annotations[LOCAL_CONFIG] != "false"


def _build(directory: Path, objects: list[Manifest], component: bool = False) -> list[Manifest]:
    """Add a kustomization's (or a component's) objects to `objects` and apply its edits."""
    spec = _load_kustomization(directory)
    if (spec.get("kind") == "Component") != component:
        raise UnsupportedKustomization(f"{directory}: kind {spec.get('kind')} here")
    if spec.get("configMapGenerator") and spec.get("components"):
        raise UnsupportedKustomization(f"{directory}: generators and components together")
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(_build(path, []))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    objects.extend(_config_map(directory, entry) for entry in spec.get("configMapGenerator", []))
    for entry in spec.get("components", []):
        _build(directory / entry, objects, component=True)
    for patch in spec.get("patches", []):
        _apply_patch(directory, objects, patch)
    for image in spec.get("images", []):
        set_image(objects, image)
    for replacement in spec.get("replacements", []):
        replace(objects, replacement)
    return objects


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            spec = yaml.safe_load(path.read_text()) or {}
            unknown = set(spec) - _SUPPORTED_KEYS
            if unknown:
                raise UnsupportedKustomization(f"{path}: unsupported fields {sorted(unknown)}")
            return spec
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _config_map(directory: Path, entry: dict[str, Any]) -> Manifest:
    """The ConfigMap a configMapGenerator entry makes (kustomize api/kv/kv.go: files verbatim)."""
    options = entry.get("options") or {}
    if set(entry) - {"name", "files", "options"} or set(options) - {
        "annotations",
        "labels",
        "disableNameSuffixHash",
    }:
        raise UnsupportedKustomization(f"configMapGenerator entry {entry!r}")
    metadata: dict[str, Any] = {"name": entry["name"]}
    for field in ("annotations", "labels"):
        if options.get(field):
            metadata[field] = dict(options[field])
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {}}
    if not local_config(config_map) and not options.get("disableNameSuffixHash"):
        raise UnsupportedKustomization(f"{entry['name']}: the name hash suffix is not rendered")
    for source in entry.get("files", []):
        key, _, path = source.rpartition("=")
        config_map["data"][key or Path(path).name] = (directory / path).read_text()
    return config_map


def _apply_patch(directory: Path, objects: list[Manifest], patch: dict[str, Any]) -> None:
    unknown = set(patch) - {"path", "patch", "target"}
    if unknown:
        raise UnsupportedKustomization(f"patch fields {sorted(unknown)}")
    if "path" in patch:
        operations = yaml.safe_load((directory / patch["path"]).read_text())
    else:
        operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise UnsupportedKustomization("only JSON 6902 patches (operation lists) are supported")
    target = patch.get("target") or {}
    if not target or set(target) - _TARGET_KEYS:
        raise UnsupportedKustomization(f"patch target {target!r}")
    matched = [obj for obj in objects if matches(obj, target)]
    if not matched:
        raise ValueError(f"patch target {target!r} matches no object")
    for obj in matched:
        for operation in operations:
            apply_json6902(obj, operation)
