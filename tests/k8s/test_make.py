"""`make images`, `make push` and `make overlay` (no Docker engine here: DOCKER= names a
stand-in): the image names the manifests use, the digests `make push` records, and the overlay
that points every container at the registry, pinned by digest when one is known."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.k8s.checks import (
    IMAGE_TAG,
    REPO,
    SERVE_IMAGE,
    UI_IMAGE,
    containers,
    key,
    placeholder_problems,
    rendered,
)
from tests.k8s.kustomize import render


def make(*args: str) -> subprocess.CompletedProcess[str]:
    """`make ARGS` at the repository's root (no docker needed: DOCKER= names a stand-in)."""
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_make_images_builds_the_names_the_manifests_use() -> None:
    """`make -n images/push`: both Dockerfiles (serve: neuron, nxdi and cpu targets) under
    REGISTRY; the serve image's overlays (nxdi, cpu) use its -nxdi and -cpu tags."""
    registry, tag = "registry.example/team", "9.9.9"
    serve, ui = (f"{registry}/{image.rsplit('/', 1)[1]}" for image in (SERVE_IMAGE, UI_IMAGE))
    builds = make("-n", "images", f"REGISTRY={registry}", f"TAG={tag}").stdout.splitlines()
    assert builds == [
        f"docker build -f Dockerfile.serve --target neuron -t {serve}:{tag} .",
        f"docker build -f Dockerfile.serve --target nxdi -t {serve}:{tag}-nxdi .",
        f"docker build -f Dockerfile.serve --target cpu -t {serve}:{tag}-cpu .",
        f"docker build -f Dockerfile.ui -t {ui}:{tag} .",
    ]
    pushed = make("-n", "push", f"REGISTRY={registry}", f"TAG={tag}").stdout
    for image in (f"{serve}:{tag}", f"{serve}:{tag}-nxdi", f"{serve}:{tag}-cpu", f"{ui}:{tag}"):
        assert image in pushed
    # Each tag suffix is the one its overlay's `images:` entry names.
    for overlay in ("nxdi", "cpu"):
        images = {c["image"] for obj in rendered(overlay) for c in containers(obj)}
        assert f"{SERVE_IMAGE}:{IMAGE_TAG}-{overlay}" in images


# A stand-in for the docker CLI: `push` prints what docker prints; `inspect --format
# '{{range .RepoDigests}}{{println .}}{{end}}' IMAGE` prints the image's repository digests, one
# per line, another registry's first (docker lists every repository the image was pushed to).
FAKE_DOCKER = """#!/usr/bin/env bash
digest() { printf 'sha256:%s' "$(printf '%s' "$1" | sha256sum | cut -c1-64)"; }
image="${*: -1}"
case "$1" in
  push) echo "The push refers to repository [${image%:*}]"
        echo "${image##*:}: digest: $(digest "$image") size: 529" ;;
  inspect) echo "mirror.example/copy@$(digest mirror)"
           echo "${image%:*}@$(digest "$image")" ;;
  *) exit 1 ;;
esac
"""


def fake_digest(image: str) -> str:
    """The digest FAKE_DOCKER reports for an image it pushed."""
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


def test_make_push_records_each_pushed_digest(tmp_path: Path) -> None:
    """`make push` writes `<image:tag> <digest>` for each pushed image, the registry's own digest
    of it, into OVERLAY_DIR/digests; a later push of the same tag replaces its line."""
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    overlay = tmp_path / "release"
    for _ in range(2):
        make(
            "push",
            f"DOCKER={docker}",
            "REGISTRY=registry.example/team",
            "TAG=9.9.9",
            f"OVERLAY_DIR={overlay}",
        )
    images = [
        "registry.example/team/mistral-inf2-chat-serve:9.9.9",
        "registry.example/team/mistral-inf2-chat-serve:9.9.9-nxdi",
        "registry.example/team/mistral-inf2-chat-serve:9.9.9-cpu",
        "registry.example/team/mistral-inf2-chat-ui:9.9.9",
    ]
    lines = (overlay / "digests").read_text().splitlines()
    assert sorted(lines) == sorted(f"{image} {fake_digest(image)}" for image in images)


def _overlay(
    overlay: Path, monitoring: str = "", engine: str = "neuron"
) -> subprocess.CompletedProcess[str]:
    return make(
        "overlay",
        "REGISTRY=registry.example/team",
        "TAG=9.9.9",
        f"OVERLAY_DIR={overlay}",
        f"MONITORING={monitoring}",
        f"ENGINE={engine}",
    )


@pytest.mark.parametrize("monitoring", ["", "1"])
def test_make_overlay_points_every_container_at_the_registry(
    tmp_path: Path, monitoring: str
) -> None:
    """Without recorded digests: the written overlay renders k8s/ (plus monitoring) with only the
    images changed, to the mutable tags, and `make overlay` says so."""
    overlay = tmp_path / "release"
    result = _overlay(overlay, monitoring)
    assert "no digest" in result.stderr and "mutable tag" in result.stderr
    objects = render(overlay)
    assert placeholder_problems(objects) == []
    images = {c["image"] for obj in objects for c in containers(obj)}
    assert images == {
        "registry.example/team/mistral-inf2-chat-serve:9.9.9",
        "registry.example/team/mistral-inf2-chat-ui:9.9.9",
    }
    expected = rendered("monitoring" if monitoring else "root")
    for obj in expected:
        for container in containers(obj):
            name = container["image"].split(":")[0].rsplit("/", 1)[1]
            container["image"] = f"registry.example/team/{name}:9.9.9"
    assert sorted(objects, key=key) == sorted(expected, key=key)


def test_make_overlay_pins_the_recorded_digests(tmp_path: Path) -> None:
    """With digests recorded by `make push` for REGISTRY and TAG, every image is pinned by
    digest (the tag stays, for people); a digest recorded for another tag is not used."""
    overlay = tmp_path / "release"
    overlay.mkdir()
    serve = "registry.example/team/mistral-inf2-chat-serve"
    ui = "registry.example/team/mistral-inf2-chat-ui"
    (overlay / "digests").write_text(
        f"{serve}:9.9.8 {fake_digest('old')}\n"
        f"{serve}:9.9.9 {fake_digest('serve')}\n"
        f"{ui}:9.9.9 {fake_digest('ui')}\n"
    )
    result = _overlay(overlay)
    assert "no digest" not in result.stderr
    images = {c["image"] for obj in render(overlay) for c in containers(obj)}
    assert images == {
        f"{serve}:9.9.9@{fake_digest('serve')}",
        f"{ui}:9.9.9@{fake_digest('ui')}",
    }


def test_make_overlay_warns_for_each_image_without_a_digest(tmp_path: Path) -> None:
    """Only the UI's digest known: the serve image keeps its tag, and the warning names it."""
    overlay = tmp_path / "release"
    overlay.mkdir()
    ui = "registry.example/team/mistral-inf2-chat-ui"
    (overlay / "digests").write_text(f"{ui}:9.9.9 {fake_digest('ui')}\n")
    result = _overlay(overlay)
    assert "mistral-inf2-chat-serve:9.9.9" in result.stderr and ui not in result.stderr
    images = {c["image"] for obj in render(overlay) for c in containers(obj)}
    assert images == {
        "registry.example/team/mistral-inf2-chat-serve:9.9.9",
        f"{ui}:9.9.9@{fake_digest('ui')}",
    }


def test_make_overlay_engine_nxdi_renders_the_nxdi_overlay_with_its_image(tmp_path: Path) -> None:
    """ENGINE=nxdi: the written overlay renders k8s/overlays/nxdi with only the images changed,
    the serve image to its -nxdi tag (pinned by its own recorded digest); another engine name
    is refused."""
    overlay = tmp_path / "release"
    overlay.mkdir()
    serve = "registry.example/team/mistral-inf2-chat-serve"
    ui = "registry.example/team/mistral-inf2-chat-ui"
    (overlay / "digests").write_text(
        f"{serve}:9.9.9 {fake_digest('neuron')}\n"
        f"{serve}:9.9.9-nxdi {fake_digest('nxdi')}\n"
        f"{ui}:9.9.9 {fake_digest('ui')}\n"
    )
    _overlay(overlay, engine="nxdi")
    objects = render(overlay)
    expected = rendered("nxdi")
    images = {
        f"{SERVE_IMAGE}:{IMAGE_TAG}-nxdi": f"{serve}:9.9.9-nxdi@{fake_digest('nxdi')}",
        f"{UI_IMAGE}:{IMAGE_TAG}": f"{ui}:9.9.9@{fake_digest('ui')}",
    }
    for obj in expected:
        for container in containers(obj):
            container["image"] = images[container["image"]]
    assert sorted(objects, key=key) == sorted(expected, key=key)
    with pytest.raises(subprocess.CalledProcessError) as refused:
        _overlay(tmp_path / "other", engine="vllm")
    assert "ENGINE=vllm" in refused.value.stderr
