"""The GGUF overlay (overlays/cpu-mistral-gguf): llamacpp serves a GGUF from the model volume,
with room for its weights and KV cache; its `fetch-gguf` init container pins a commit and a
sha256, and its script, run against a stand-in hub, keeps a file only when its checksum matches.

Not here: the overlay's serve config parts (test_serve_config.py), its pod security
(test_pod_security.py) and image (test_images.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.k8s.checks import (
    HF_TOKEN_ENV,
    RAYSERVICE,
    app_args,
    env_of,
    gguf_fetch,
    one,
    quantity,
    rendered,
    workers,
)


def test_cpu_mistral_overlay_serves_the_gguf_from_the_model_volume() -> None:
    """llamacpp on a GGUF the init container puts on the PVC; room for weights and KV cache."""
    cpu = one(rendered("cpu"), "RayService", RAYSERVICE)
    objects = rendered("cpu-mistral-gguf")
    gguf = one(objects, "RayService", RAYSERVICE)
    args = app_args(gguf)
    assert args["engine"] == "llamacpp"
    assert args["model"].endswith("mistral-7b-instruct-v0.2.Q4_K_M.gguf")
    assert {k: v for k, v in app_args(cpu).items() if k not in args} == {}
    (group,) = workers(gguf)
    spec = group["template"]["spec"]
    fetch = gguf_fetch(objects)
    (container,) = spec["containers"]
    claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    for mounted in (fetch, container):
        [mount] = [m for m in mounted["volumeMounts"] if m["name"] in claims]
        assert args["model"].startswith(mount["mountPath"].rstrip("/") + "/")
    env = {name: entry.get("value") for name, entry in env_of(fetch).items()}
    assert env["GGUF_REPO"] == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"
    assert f"{env['GGUF_DIR']}/{env['GGUF_FILE']}" == args["model"]
    assert not HF_TOKEN_ENV & set(env) and "HF_TOKEN_PATH" not in env  # a public repository
    # Weights (4.4 GB, memory-mapped) + the KV cache allocated at start (128 KiB per token).
    kv = args["max_batch_size"] * args["max_context_len"] * 128 * 2**10
    assert quantity(container["resources"]["limits"]["memory"]) >= 4.4e9 + kv + 2 * 2**30
    pvc = one(objects, "PersistentVolumeClaim", "mistral-model-cache")
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) >= 8 * 2**30


# TheBloke/Mistral-7B-Instruct-v0.2-GGUF at its main-branch commit, and the LFS sha256 of
# mistral-7b-instruct-v0.2.Q4_K_M.gguf there (k8s/README.md says where both were found).
GGUF_REVISION = "3a6fbf4a41a1d52e415a4958cde6856d34b2db93"


GGUF_SHA256 = "3e0039fd0273fcbebb49228943b17831aadd55cbcbf56f0af00499be2040ccf9"


# A stand-in for huggingface_hub with hf_hub_download's real signature (repo_id, filename,
# keyword-only revision, local_dir, force_download, ...): with `local_dir` the real one puts the
# file at local_dir/filename and returns that path. This one writes $FAKE_HUB_CONTENT there and
# logs each call to $FAKE_HUB_CALLS.
_FAKE_HUB = """
import json, os
from pathlib import Path


def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, force_download=False,
                    **kwargs):
    target = Path(local_dir) / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(Path(os.environ["FAKE_HUB_CONTENT"]).read_bytes())
    call = {"repo_id": repo_id, "filename": filename, "revision": revision,
            "force_download": force_download}
    with open(os.environ["FAKE_HUB_CALLS"], "a") as log:
        log.write(json.dumps(call) + "\\n")
    return str(target)
"""


def _run_fetch(tmp_path: Path, existing: bytes | None, served: bytes, expected: bytes) -> Any:
    """Run fetch-gguf's script against the fake hub: a file already on the volume (or none), what
    the hub serves, the content whose sha256 the container pins."""
    fetch = gguf_fetch(rendered("cpu-mistral-gguf"))
    env = {name: entry["value"] for name, entry in env_of(fetch).items()}
    (tmp_path / "fake" / "huggingface_hub").mkdir(parents=True)
    (tmp_path / "fake" / "huggingface_hub" / "__init__.py").write_text(_FAKE_HUB)
    (tmp_path / "served").write_bytes(served)
    models = tmp_path / "models"
    models.mkdir()
    target = models / env["GGUF_FILE"]
    if existing is not None:
        target.write_bytes(existing)
    env.update(
        GGUF_DIR=str(models),
        GGUF_SHA256=hashlib.sha256(expected).hexdigest(),
        HF_HOME=str(tmp_path / "hf"),
        PYTHONPATH=str(tmp_path / "fake"),
        FAKE_HUB_CONTENT=str(tmp_path / "served"),
        FAKE_HUB_CALLS=str(tmp_path / "calls"),
        PATH=os.environ["PATH"],
    )
    assert fetch["command"][:2] == ["python", "-c"]
    result = subprocess.run(
        [sys.executable, "-c", fetch["command"][2]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return result, [json.loads(call) for call in calls], target


def test_gguf_download_pins_revision_and_checksum() -> None:
    """fetch-gguf names the repository's commit and the file's sha256, not a branch."""
    env = {
        name: entry.get("value")
        for name, entry in env_of(gguf_fetch(rendered("cpu-mistral-gguf"))).items()
    }
    assert (env["GGUF_REVISION"], env["GGUF_SHA256"]) == (GGUF_REVISION, GGUF_SHA256)


def test_gguf_download_is_verified(tmp_path: Path) -> None:
    """No file: downloaded at the pinned revision, kept once its sha256 matches."""
    result, calls, target = _run_fetch(tmp_path, None, b"weights", b"weights")
    assert result.returncode == 0, result.stderr
    assert [c["revision"] for c in calls] == [GGUF_REVISION]
    assert calls[0]["repo_id"] == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"
    assert target.read_bytes() == b"weights"


def test_gguf_on_the_volume_is_trusted_only_when_its_checksum_matches(tmp_path: Path) -> None:
    """The right file is kept without a download; a wrong one (truncated, another file by the
    same name) is downloaded again."""
    result, calls, _ = _run_fetch(tmp_path / "right", b"weights", b"other", b"weights")
    assert (result.returncode, calls) == (0, [])
    result, calls, target = _run_fetch(tmp_path / "wrong", b"weigh", b"weights", b"weights")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1 and target.read_bytes() == b"weights"


def test_gguf_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    """A download whose sha256 differs fails the init container (the worker does not start on
    it) and is not left on the volume."""
    result, calls, target = _run_fetch(tmp_path, None, b"tampered", b"weights")
    assert result.returncode != 0 and "sha256" in result.stderr
    assert len(calls) == 1 and not target.exists()
