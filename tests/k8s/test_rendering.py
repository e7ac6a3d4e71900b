"""Rendering: the pure-Python renderer builds what `kubectl kustomize` builds (where kubectl is
installed), k8s/ is the backend plus the UI, every object sits in a namespace its kustomization
creates; and the renderer's kustomize features behave as kustomize's source does (a replacement
into one part of a delimited string, local-config objects read by overlays but never emitted),
while what it does not implement it refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.checks import KUSTOMIZATIONS, find, key, rendered
from tests.k8s.kustomize import (
    LOCAL_CONFIG,
    Manifest,
    UnsupportedKustomization,
    kubectl,
    render_kubectl,
    render_python,
)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pure_python_renderer_matches_kubectl(name: str) -> None:
    """Our renderer (used where kubectl is missing) builds what `kubectl kustomize` builds."""
    if kubectl() is None:
        pytest.skip("kubectl is not installed")
    ours = sorted(render_python(KUSTOMIZATIONS[name]), key=key)
    theirs = sorted(render_kubectl(KUSTOMIZATIONS[name]), key=key)
    assert ours == theirs


def test_top_level_kustomization_is_mistral_plus_gradio() -> None:
    """k8s/ deploys exactly the backend and the UI."""
    both = rendered("mistral") + rendered("gradio")
    assert sorted(rendered("root"), key=key) == sorted(both, key=key)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_is_namespaced_in_a_rendered_namespace(name: str) -> None:
    """Each namespaced object names its namespace, and the kustomization creates it."""
    objects = rendered(name)
    namespaces = {obj["metadata"]["name"] for obj in find(objects, "Namespace")}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in namespaces, key(obj)


KUSTOMIZATION = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
LOCAL = {"annotations": {LOCAL_CONFIG: "true"}}


def _write(directory: Path, files: dict[str, Any]) -> None:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))


def _replacement(index: int, field_path: str = "data.text") -> dict[str, Any]:
    return {
        "source": {"kind": "ConfigMap", "name": "parts", "fieldPath": "data.part"},
        "targets": [
            {
                "select": {"kind": "ConfigMap", "name": "target"},
                "fieldPaths": [field_path],
                "options": {"delimiter": "|", "index": index},
            }
        ],
    }


def _base(directory: Path, **extra: Any) -> None:
    """A kustomization with a target string "a|b|c" and a local-config ConfigMap `parts`."""
    target = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "target"}}
    generator = {"name": "parts", "files": ["part=part.txt"], "options": LOCAL}
    _write(
        directory,
        {
            "target.yaml": {**target, "data": {"text": "a|b|c"}},
            "part.txt": "X",
            "kustomization.yaml": {
                **KUSTOMIZATION,
                "resources": ["target.yaml"],
                "configMapGenerator": [generator],
                **extra,
            },
        },
    )


@pytest.mark.parametrize(("index", "expected"), [(1, "a|X|c"), (-1, "X|a|b|c"), (3, "a|b|c|X")])
def test_a_replacement_sets_one_part_of_a_delimited_string(
    tmp_path: Path, index: int, expected: str
) -> None:
    """As kustomize's `setFieldValue`: the part at `index` replaced, a negative index prepended,
    one past the end appended. The source, local-config in the base, is read by the overlay and
    never emitted."""
    _base(tmp_path / "base")
    overlay = {**KUSTOMIZATION, "resources": ["../base"], "replacements": [_replacement(index)]}
    _write(tmp_path / "overlay", {"kustomization.yaml": overlay})
    objects: list[Manifest] = render_python(tmp_path / "overlay")
    assert [(o["metadata"]["name"], o["data"]) for o in objects] == [("target", {"text": expected})]


REFUSED: dict[str, dict[str, Any]] = {
    "a namespace for all": {"namespace": "elsewhere"},
    "replacements from a file": {"replacements": [{"path": "replacements.yaml"}]},
    "a field inside a string": {"replacements": [_replacement(1, "data.text.inner")]},
    "a name with its hash": {"configMapGenerator": [{"name": "h", "files": ["part.txt"]}]},
    "generators beside components": {"components": ["../component"]},
}


@pytest.mark.parametrize("case", REFUSED)
def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path, case: str) -> None:
    """What kustomize would do differently from our renderer raises, never renders."""
    _base(tmp_path / "base", **REFUSED[case])
    component = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component"}
    _write(tmp_path / "component", {"kustomization.yaml": component})
    with pytest.raises(UnsupportedKustomization):
        render_python(tmp_path / "base")
