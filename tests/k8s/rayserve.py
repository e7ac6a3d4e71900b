"""What Ray's own code makes of the manifests: the Serve application as Ray Serve builds it from
the serve config's import path and args (its deployments, the ingress as the config's
`deployments` entry overrides it, one replica's resource demand), and the Ray autoscaler's view of
the RayCluster (node types, their resources, min and max workers), from the installed Ray.

Not here: placing replicas on nodes (test_autoscaling.py feeds these views to the autoscaler's
bin-packing), nor anything KubeRay does (kuberay.py).
"""

from __future__ import annotations

from typing import Any

from tests.k8s.checks import RAY_NAMESPACE, serve_config
from tests.k8s.kustomize import Manifest


def autoscaler_view(rayservice: Manifest) -> dict[str, Any]:
    """The autoscaling config the Ray autoscaler derives from the RayCluster (Ray's own code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cluster = {
        "metadata": {"name": "mistral-abc12", "namespace": RAY_NAMESPACE},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    return _derive_autoscaling_config_from_ray_cr(cluster)


def serve_app(rayservice: Manifest) -> Any:
    """The application as Ray Serve builds it from the manifest's import path and args."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from backend.deployments import build_app

    (application,) = serve_config(rayservice)["applications"]
    return build_serve_app(build_app(application["args"]), name=application["name"])


def model_deployment(rayservice: Manifest) -> Any:
    """The model deployment as Ray Serve builds it from the manifest's application."""
    [model] = [d for d in serve_app(rayservice).deployments if d.name == "model"]
    return model


def replica_demand(ray_actor_options: dict[str, Any]) -> dict[str, float]:
    """The Ray resources one replica asks for (Serve's default: one CPU)."""
    demand = {"CPU": float(ray_actor_options.get("num_cpus", 1))}
    demand.update(ray_actor_options.get("resources") or {})
    return {name: amount for name, amount in demand.items() if amount}


def ingress_options(rayservice: Manifest) -> tuple[str, int, dict[str, Any]]:
    """Name, replicas and ray_actor_options of the ingress deployment as Serve runs it: the
    serve config's `deployments` entry replaces what the code sets (Serve's
    `override_deployment_info` takes a config's ray_actor_options whole)."""
    built = serve_app(rayservice)
    name = built.ingress_deployment_name
    [code] = [d for d in built.deployments if d.name == name]
    (application,) = serve_config(rayservice)["applications"]
    override = {d["name"]: d for d in application.get("deployments", [])}.get(name, {})
    replicas = override.get("num_replicas", code._deployment_config.num_replicas)
    return name, replicas, override.get("ray_actor_options", code.ray_actor_options or {})
