"""Images: one placeholder per image (the cpu tag in the CPU overlays), and every container and
init container follows `images:` and `kustomize edit set image` wherever all the images can be
set. Each check also reports a deliberately broken copy.

Not here: the images' contents (test_dockerfiles.py) and `make overlay` (test_make.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.k8s.checks import (
    IMAGE_TAG,
    K8S,
    KUSTOMIZATIONS,
    SERVE_IMAGE,
    UI_IMAGE,
    containers,
    gguf_fetch,
    key,
    placeholder_problems,
    rendered,
)
from tests.k8s.kustomize import Manifest, render


@pytest.mark.parametrize(
    ("name", "serve_tag"),
    [
        ("root", IMAGE_TAG),
        ("mistral", IMAGE_TAG),
        ("gradio", IMAGE_TAG),
        ("cpu", f"{IMAGE_TAG}-cpu"),
        ("cpu-mistral-gguf", f"{IMAGE_TAG}-cpu"),
        ("nxdi", f"{IMAGE_TAG}-nxdi"),
    ],
)
def test_images_are_overridable_placeholders(name: str, serve_tag: str) -> None:
    """One placeholder per image, the same on head and workers; CPU overlay uses the cpu tag."""
    expected = {"RayService": f"{SERVE_IMAGE}:{serve_tag}", "Deployment": f"{UI_IMAGE}:{IMAGE_TAG}"}
    for obj in rendered(name):
        for container in containers(obj):
            assert container["image"] == expected[obj["kind"]], (key(obj), container["name"])


def test_kustomize_images_override_every_container(tmp_path: Path) -> None:
    """An `images:` entry on top of k8s/ rewrites the RayService and the UI images."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S, tmp_path)],
                "images": [
                    {"name": SERVE_IMAGE, "newName": "registry.example/serve", "newTag": "1.2.3"},
                    {"name": UI_IMAGE, "newName": "registry.example/ui", "newTag": "1.2.3"},
                ],
            }
        )
    )
    images = {c["image"] for obj in render(tmp_path) for c in containers(obj)}
    assert images == {"registry.example/serve:1.2.3", "registry.example/ui:1.2.3"}


def _image_names(objects: list[Manifest]) -> set[str]:
    return {c["image"].split(":")[0] for obj in objects for c in containers(obj)}


def built_on(directory: Path) -> list[Path]:
    """A kustomization and every kustomization it builds on (its directory resources)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    found = [directory]
    for entry in spec.get("resources", []):
        if (directory / entry).is_dir():
            found += [d for d in built_on((directory / entry).resolve()) if d not in found]
    return found


def image_setting_places(directory: Path) -> list[Path]:
    """Where one can set all of a kustomization's images: itself, or any kustomization it builds
    on that holds every one of them (overlays/cpu for overlays/cpu-mistral-gguf)."""
    names = _image_names(render(directory))
    return [d for d in built_on(directory) if _image_names(render(d)) >= names]


def kustomize_edit_set_image(directory: Path, name: str, new: str) -> None:
    """What `kustomize edit set image NAME=NEW` writes: DIRECTORY's `images:` entry for NAME."""
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text())
    new_name, _, new_tag = new.rpartition(":")
    images = [image for image in spec.get("images", []) if image["name"] != name]
    spec["images"] = [*images, {"name": name, "newName": new_name, "newTag": new_tag}]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_image_follows_kustomize_edit_set_image(tmp_path: Path, name: str) -> None:
    """Wherever all the images can be set (`kustomize edit set image` in the kustomization, or in
    one it builds on, as k8s/README.md says for overlays/cpu), every container and init container
    of the rendering follows: none keeps a placeholder."""
    target = KUSTOMIZATIONS[name].relative_to(K8S)
    for base in image_setting_places(KUSTOMIZATIONS[name]):
        tree = tmp_path / base.relative_to(K8S).as_posix().replace("/", "-") / "k8s"
        shutil.copytree(K8S, tree)
        where = tree / base.relative_to(K8S)
        kustomize_edit_set_image(where, SERVE_IMAGE, "registry.example/serve:1.2.3")
        kustomize_edit_set_image(where, UI_IMAGE, "registry.example/ui:1.2.3")
        objects = render(tree / target)
        assert placeholder_problems(objects) == [], f"images set in {base.relative_to(K8S)}"
        if base == KUSTOMIZATIONS[name]:
            images = {c["image"] for obj in objects for c in containers(obj)}
            assert images <= {"registry.example/serve:1.2.3", "registry.example/ui:1.2.3"}


def _broken_placeholder() -> list[str]:
    """The GGUF overlay as it was: its init container names the placeholder itself, after the
    CPU overlay's image transformer has run."""
    objects = rendered("cpu-mistral-gguf")
    gguf_fetch(objects)["image"] = f"{SERVE_IMAGE}:{IMAGE_TAG}-cpu"
    for obj in objects:
        for container in containers(obj):
            if container["name"] != "fetch-gguf":
                container["image"] = container["image"].replace("ghcr.io/OWNER", "registry.example")
    return placeholder_problems(objects)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "placeholder image left": _broken_placeholder,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
