"""The RayService's cluster: the contract names (KubeRay's serve Service is the UI's backend URL),
a head that takes no Ray work, inf2 workers that fit the model replicas, shared memory for the
object store, the model caches on a ReadWriteMany volume (NewCluster upgrades), KubeRay's own
probes kept, and what the CPU overlay takes away.

Not here: the schemas (test_schemas.py), the serve config (test_serve_config.py), scaling
(test_autoscaling.py), pod security (test_pod_security.py), the GGUF overlay (test_gguf.py).
"""

from __future__ import annotations

import json

import pytest

from tests.k8s.checks import (
    BACKEND_URL,
    CORES_PER_INF2_DEVICE,
    HF_TOKEN_ENV,
    NEURON_DEVICE,
    RAY_KUSTOMIZATIONS,
    RAY_NAMESPACE,
    RAYSERVICE,
    SERVE_PORT,
    app_args,
    containers,
    env_of,
    one,
    pod_templates,
    quantity,
    ray_resources,
    rendered,
    serve_config,
    workers,
)
from tests.k8s.kustomize import Manifest


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


@pytest.mark.parametrize(("name", "engine"), [("mistral", "neuron"), ("nxdi", "nxdi")])
def test_neuron_worker_fits_the_model_replicas(name: str, engine: str) -> None:
    """inf2 nodes, the Neuron taint, 2 NeuronCores per device, enough cores and CPUs: for
    transformers-neuronx (the base) and NxD Inference (overlays/nxdi) alike."""
    rayservice = one(rendered(name), "RayService", RAYSERVICE)
    args = app_args(rayservice)
    assert args["engine"] == engine
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
