"""The edits kustomize makes to the objects a kustomization has gathered, as far as k8s/ uses
them: JSON 6902 patch operations, the image transformer and replacements (kubernetes-sigs/kustomize
api/filters/imagetag and api/filters/replacement/replacement.go).

Covered: `add`, `remove`, `replace` and `copy` operations; `images` entries with name, newName,
newTag and digest, on `containers` and `initContainers` anywhere in an object; a replacement's
`source` (exact group/version/kind/name/namespace, a dotted `fieldPath`, `options.delimiter` and
`index`: one part of the source string) copied into its `targets` (`select` by anchored regular
expressions, dotted `fieldPaths` to fields that exist). With `options.delimiter` on a target, as
`setFieldValue` does: the target string split at the delimiter, the part at `index` replaced, a
negative index prepended, one past the end appended, the parts joined again.

Not covered (each raises `UnsupportedKustomization`): `move`, `test` operations; replacements with
`reject`, label or annotation selectors or `options.create`; list items (`[name=x]`, indexes) in
field paths, and fields inside a string (kustomize v5.8's structured-data targets).
"""

from __future__ import annotations

import copy
import re
from typing import Any

_TARGET_KEYS = {"group", "version", "kind", "name", "namespace"}

Manifest = dict[str, Any]


class UnsupportedKustomization(ValueError):
    """Raised when a kustomization uses a feature the pure-Python renderer does not implement."""


def identity(obj: Manifest) -> dict[str, str]:
    """group, version, kind, name and namespace of an object (empty strings where unset)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    metadata = obj.get("metadata", {})
    return {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": metadata.get("name", ""),
        "namespace": metadata.get("namespace", ""),
    }


def matches(obj: Manifest, target: dict[str, str]) -> bool:
    """Whether a patch target or a replacement `select` (anchored regular expressions) selects
    the object."""
    actual = identity(obj)
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


def _field(obj: Manifest, path: str) -> tuple[dict[str, Any], str]:
    """The mapping holding a dotted field path's last key, and that key (which must exist)."""
    if "[" in path or "\\" in path:
        raise UnsupportedKustomization(f"field path {path!r}: list items or escapes")
    *parents, last = path.split(".")
    node: Any = obj
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (list, str)):  # an index, or kustomize v5.8's structured data
            raise UnsupportedKustomization(f"field path {path!r} goes into a list or a string")
    if not isinstance(node, dict) or last not in node:
        raise ValueError(f"unable to find field {path!r} in {identity(obj)}")
    return node, last


def _options(options: dict[str, Any] | None) -> tuple[str, int]:
    options = options or {}
    if set(options) - {"delimiter", "index"}:
        raise UnsupportedKustomization(f"replacement options {options!r}")
    return options.get("delimiter", ""), int(options.get("index", 0))


def replace(objects: list[Manifest], replacement: dict[str, Any]) -> None:
    """kustomize's replacement transformer: copy the source field into every target field."""
    source = dict(replacement.get("source") or {})
    if set(replacement) - {"source", "targets"} or not replacement.get("targets"):
        raise UnsupportedKustomization(f"replacement {replacement!r}")
    field_path = source.pop("fieldPath", None)
    delimiter, index = _options(source.pop("options", None))
    if not field_path or set(source) - _TARGET_KEYS:
        raise UnsupportedKustomization(f"replacement source {replacement['source']!r}")
    found = [o for o in objects if all(identity(o)[k] == v for k, v in source.items())]
    if len(found) != 1:
        raise ValueError(f"replacement source {source!r} selects {len(found)} objects")
    node, key = _field(found[0], field_path)
    value = node[key]
    if delimiter:  # getRefinedValue: one part of the source string
        parts = str(value).split(delimiter)
        if not 0 <= index < len(parts):
            raise ValueError(f"options.index {index} is out of bounds for {value!r}")
        value = parts[index]
    for target in replacement["targets"]:
        select = target.get("select") or {}
        if set(target) - {"select", "fieldPaths", "options"} or set(select) - _TARGET_KEYS:
            raise UnsupportedKustomization(f"replacement target {target!r}")
        delimiter, index = _options(target.get("options"))
        for obj in [o for o in objects if matches(o, select)]:
            for path in target.get("fieldPaths") or ["metadata.name"]:
                node, key = _field(obj, path)
                node[key] = splice(node[key], value, delimiter, index)


def splice(old: Any, value: Any, delimiter: str, index: int) -> Any:
    """`setFieldValue`: the new value, or with a delimiter the old string with one part set."""
    if not delimiter:
        return copy.deepcopy(value)
    if not isinstance(old, str):
        raise ValueError("delimiter option can only be used with scalar nodes")
    parts = old.split(delimiter)
    if index < 0:
        parts.insert(0, str(value))
    elif index >= len(parts):
        parts.append(str(value))
    else:
        parts[index] = str(value)
    return delimiter.join(parts)


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
