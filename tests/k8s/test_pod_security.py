"""Pod security of every pod that every kustomization creates (KubeRay's additions included): both
namespaces enforce `restricted`, every pod meets it control by control (pod_security.py), the
hardening beyond it holds (hardening.py), and the pods run as their images' numeric users. Each
rule also reports a deliberately broken copy of every real pod.

Not here: what the admission controller itself does with the labels (no cluster runs here).
"""

from __future__ import annotations

import copy

import pytest

from tests.k8s.checks import (
    K8S_VERSION,
    KUSTOMIZATIONS,
    RAY_NAMESPACE,
    RAYSERVICE,
    REPO,
    UI_DEPLOYMENT,
    UI_NAMESPACE,
    find,
    one,
    pod_templates,
    rendered,
)
from tests.k8s.dockerfiles import dockerfile_stages, stage_user
from tests.k8s.hardening import HARDENING
from tests.k8s.kustomize import Manifest
from tests.k8s.pod_security import RESTRICTED, Rule, pods

PSA = "pod-security.kubernetes.io/"
PINNED = "v" + ".".join(K8S_VERSION.split(".")[:2])
RULES = {**RESTRICTED, **HARDENING}


def namespace_problems(objects: list[Manifest]) -> list[str]:
    """Both namespaces enforce `restricted` at a pinned version (a new Kubernetes release does not
    change what is admitted), and warn and audit at the same level."""
    problems = []
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"].get("labels", {})
        for ns in find(objects, "Namespace")
    }
    for name, labels in namespaces.items():
        for mode in ("enforce", "warn", "audit"):
            if labels.get(PSA + mode) != "restricted":
                problems.append(f"{name}: {mode} is {labels.get(PSA + mode)!r}, not restricted")
            if labels.get(f"{PSA}{mode}-version") != PINNED:
                problems.append(f"{name}: {mode}-version is not {PINNED}")
    return problems


def rule_problems(rule: Rule, objects: list[Manifest]) -> dict[str, list[str]]:
    """What a rule reports, by pod."""
    found = {
        label: rule.check(pod.get("metadata") or {}, pod["spec"])
        for label, pod in pods(objects).items()
    }
    return {label: problems for label, problems in found.items() if problems}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_namespaces_enforce_restricted(name: str) -> None:
    """Every rendered namespace enforces (and warns and audits) `restricted`, version pinned."""
    assert namespace_problems(rendered(name)) == []


def test_both_namespaces_are_covered() -> None:
    """The backend's and the UI's namespaces are both rendered, so both are checked."""
    names = {ns["metadata"]["name"] for ns in find(rendered("root"), "Namespace")}
    assert names == {RAY_NAMESPACE, UI_NAMESPACE}


def test_namespace_check_catches_baseline() -> None:
    """The check reports a namespace that enforces only `baseline` (the old `mistral`)."""
    objects = rendered("root")
    labels = find(objects, "Namespace")[0]["metadata"]["labels"]
    labels[PSA + "enforce"] = "baseline"
    assert namespace_problems(objects) != []


@pytest.mark.parametrize("rule", RESTRICTED)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_pod_meets_the_restricted_control(name: str, rule: str) -> None:
    """One control of the restricted profile, on every pod of the kustomization."""
    assert rule_problems(RESTRICTED[rule], rendered(name)) == {}


@pytest.mark.parametrize("rule", HARDENING)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_pod_meets_the_hardening_rule(name: str, rule: str) -> None:
    """Read-only root filesystems written only through volumes, no unused token, bounded
    ephemeral storage and emptyDirs, on every pod of the kustomization."""
    assert rule_problems(HARDENING[rule], rendered(name)) == {}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_reports_a_broken_pod(rule: str) -> None:
    """Each rule reports every real pod (UI, head, worker) broken in its own way."""
    for label, pod in pods(rendered("root")).items():
        broken = copy.deepcopy(pod)
        RULES[rule].breaks(broken)
        assert RULES[rule].check(broken.get("metadata") or {}, broken["spec"]), label


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
