"""Render the kustomizations under k8s/: with `kubectl kustomize` when it is installed, otherwise
with a small pure-Python renderer of the subset k8s/ uses.

The subset: `resources` (files and directories), `components` (directories holding a
`kind: Component`), `patches` whose patch is a JSON 6902 operation list (`add`, `remove`,
`replace`, `copy`; from `path` or inline `patch`, selected by `target`), and `images` (name,
newName, newTag, digest). Anything else raises `UnsupportedKustomization`, so the two renderers
cannot silently disagree; a test compares them whenever kubectl is present.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
_TARGET_KEYS = {"group", "version", "kind", "name", "namespace"}

Manifest = dict[str, Any]


class UnsupportedKustomization(ValueError):
    """Raised when a kustomization uses a feature the pure-Python renderer does not implement."""


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
    spec = _load_kustomization(directory)
    if spec.get("kind") == "Component":
        raise UnsupportedKustomization(f"{directory} is a Component: render a kustomization")
    objects: list[Manifest] = []
    _accumulate(directory, spec, objects)
    return objects


def _accumulate(directory: Path, spec: dict[str, Any], objects: list[Manifest]) -> None:
    """Add a kustomization's resources to `objects`, then apply its components and edits
    (kustomize's order: components come after the resources, before the own patches)."""
    for entry in spec.get("resources", []):
        objects.extend(_load_resource(directory / entry))
    for entry in spec.get("components", []):
        component = _load_kustomization(directory / entry)
        if component.get("kind") != "Component":
            raise UnsupportedKustomization(f"{directory / entry} is not a Component")
        _accumulate(directory / entry, component, objects)
    _apply_edits(directory, spec, objects)


def _apply_edits(directory: Path, spec: dict[str, Any], objects: list[Manifest]) -> None:
    for patch in spec.get("patches", []):
        _apply_patch(directory, objects, patch)
    for image in spec.get("images", []):
        set_image(objects, image)


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


def _load_resource(path: Path) -> list[Manifest]:
    if path.is_dir():
        return render_python(path)
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


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
    matched = [obj for obj in objects if _matches(obj, target)]
    if not matched:
        raise ValueError(f"patch target {target!r} matches no object")
    for obj in matched:
        for operation in operations:
            apply_json6902(obj, operation)


def _matches(obj: Manifest, target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    metadata = obj.get("metadata", {})
    actual = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": metadata.get("name", ""),
        "namespace": metadata.get("namespace", ""),
    }
    return all(re.fullmatch(pattern, actual[key]) for key, pattern in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _child(node: Any, key: str) -> Any:
    return node[int(key)] if isinstance(node, list) else node[key]


def _get(obj: Manifest, path: str) -> Any:
    node: Any = obj
    for key in _pointer(path):
        node = _child(node, key)
    return node


def apply_json6902(obj: Manifest, operation: dict[str, Any]) -> None:
    """Apply one `add`, `remove`, `replace` or `copy` operation in place (RFC 6902: `copy`
    adds, at `path`, the value found at `from`)."""
    op = operation["op"]
    *parents, last = _pointer(operation["path"])
    node: Any = obj
    for key in parents:
        node = _child(node, key)
    if op == "copy":
        op, value = "add", copy.deepcopy(_get(obj, operation["from"]))
    else:
        value = copy.deepcopy(operation.get("value"))
    if op == "remove" or op == "replace":
        _child(node, last)  # both require an existing target
    if op == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op == "replace":
        node[int(last) if isinstance(node, list) else last] = value
    elif op == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value
    else:
        raise UnsupportedKustomization(f"JSON 6902 operation {op!r}")


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; tag and digest may be empty."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def set_image(objects: list[Manifest], image: dict[str, str]) -> None:
    """kustomize's image transformer: rewrite matching `image` fields of (init)containers."""

    def rewrite(reference: str) -> str:
        name, tag, digest = split_image(reference)
        if name != image["name"]:
            return reference
        name = image.get("newName") or name
        # As kustomize's api/filters/imagetag/updater.go: a new tag or digest replaces both.
        new_tag, new_digest = image.get("newTag", ""), image.get("digest", "")
        if new_tag or new_digest:
            tag, digest = new_tag, new_digest
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and "image" in container:
                            container["image"] = rewrite(container["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(objects)
