"""The NxD Inference variant (overlays/nxdi, the serve image's `nxdi` target): k8s/ with only the
engine, its artifacts directory, prefix caching and the serve image's tag changed; the image
pinned to one Neuron SDK release's manifest; the docs' engine tables naming what the image pins.
Each check also reports a deliberately broken copy.

The SDK choice (2.28.1) and its evidence: k8s/README.md, "Which engine on Inferentia2". What every
kustomization must meet (schemas, pod security, policies, serve config) runs on this overlay too,
from KUSTOMIZATIONS / RAY_KUSTOMIZATIONS in checks.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.k8s.checks import (
    CORES_PER_INF2_DEVICE,
    IMAGE_TAG,
    RAYSERVICE,
    REPO,
    SERVE_IMAGE,
    app_args,
    containers,
    key,
    one,
    rendered,
    serve_config,
)
from tests.k8s.dockerfiles import dockerfile_args, dockerfile_args_of, dockerfile_stages, stage_env
from tests.k8s.kustomize import Manifest

# Neuron SDK 2.28.1 as aws-neuron/aws-neuron-sdk's src/helperscripts/n2-manifest.json lists it
# (the same pip packages as 2.28.0): the last release whose NxD Inference runs on Inf2.
SDK_2_28_PIP = {
    "neuronx-cc": "2.23.6484.0",
    "torch-neuronx": "2.9.0.2.12.22436",
    "libneuronxla": "2.2.15515.0",
    "neuronx-distributed": "0.17.26814",
    "neuronx-distributed-inference": "0.8.16251",
}
SDK_2_28_APT = {
    "NEURON_RUNTIME_LIB": "2.30.51.0",
    "NEURON_COLLECTIVES": "2.30.59.0",
    "NEURON_TOOLS": "2.28.23.0",
}
# neuronx-distributed-inference 0.8's setup.py: install_requires "transformers==4.57.*".
NXDI_TRANSFORMERS = "==4.57.*"
# torch-neuronx 2.9.0.x: torch 2.9.0 (the SDK 2.28 containers' PyTorch), torchvision its pair.
TORCH = {"torch": "2.9.0", "torchvision": "0.24.0"}
# No page of NxD Inference 0.8's docs says prefix caching (block KV layout) is supported on Inf2.
PREFIX_CACHING_DOCUMENTED_ON_INF2 = False
# What the overlay may change in the application's args; everything else stays the base's.
NXDI_ARGS = {"engine", "neuron_artifacts_dir", "prefix_caching"}


def overlay_problems(base: list[Manifest], nxdi: list[Manifest]) -> list[str]:
    """overlays/nxdi is k8s/ with the nxdi engine: the same objects, the serve image's tag
    `-nxdi` on every Ray container, and of the args only the engine, its own artifacts
    directory and prefix caching (off unless documented on Inf2) changed."""
    problems = []
    base_args = app_args(one(base, "RayService", RAYSERVICE))
    args = app_args(one(nxdi, "RayService", RAYSERVICE))
    if args.get("engine") != "nxdi":
        problems.append(f"engine {args.get('engine')!r}, not nxdi")
    if args.get("prefix_caching", True) is not PREFIX_CACHING_DOCUMENTED_ON_INF2:
        problems.append(f"prefix_caching {args.get('prefix_caching', True)!r} on Inf2")
    if args.get("neuron_artifacts_dir") in (None, base_args.get("neuron_artifacts_dir")):
        problems.append("nxdi's compiled artifacts share the neuron engine's directory")
    if not args.get("neuron_artifacts_dir", "").startswith("/data/"):
        problems.append("nxdi's compiled artifacts are not on the model volume")
    for name in sorted((set(args) | set(base_args)) - NXDI_ARGS):
        if args.get(name) != base_args.get(name):
            problems.append(
                f"args.{name}: {args.get(name)!r}, the base has {base_args.get(name)!r}"
            )
    if args.get("num_neuron_cores") != CORES_PER_INF2_DEVICE or args.get("tp_degree") != 2:
        problems.append("not 2 NeuronCores and tensor parallel 2 per replica")

    def comparable(objects: list[Manifest], overlay: bool) -> list[Manifest]:
        out = []
        for obj in sorted(objects, key=key):
            if obj["kind"] == "RayService":
                config = serve_config(obj)
                config["applications"][0].pop("args")
                obj["spec"]["serveConfigV2"] = config
                for container in containers(obj) if overlay else []:
                    if container["image"] == f"{SERVE_IMAGE}:{IMAGE_TAG}-nxdi":
                        container["image"] = f"{SERVE_IMAGE}:{IMAGE_TAG}"
                    else:
                        problems.append(f"{container['name']}: image {container['image']}")
            out.append(obj)
        return out

    if comparable(nxdi, overlay=True) != comparable(base, overlay=False):
        problems.append("objects differ from k8s/ beyond the serve image and args")
    return problems


def test_nxdi_overlay_is_k8s_with_the_nxdi_engine() -> None:
    """Same cluster, Neuron resources and policies as k8s/; the nxdi engine and image; prefix
    caching off (not documented on Inf2 for the pinned NxD Inference)."""
    assert overlay_problems(rendered("root"), rendered("nxdi")) == []


def _stage(name: str) -> list[tuple[str, str]]:
    for stage in dockerfile_stages(REPO / "Dockerfile.serve")[1:]:
        if stage[0][1].endswith(f" AS {name}"):
            return stage
    raise AssertionError(f"Dockerfile.serve has no {name} target")


def _pins(stage: list[tuple[str, str]]) -> dict[str, str]:
    runs = " ".join(arg for keyword, arg in stage if keyword == "RUN")
    found: dict[str, str] = {}
    for name, version in re.findall(r"\b([a-z][a-z0-9-]*)==([0-9][0-9.]*)", runs):
        if found.setdefault(name, version) != version:
            found[name] = "two versions"
    return found


def image_problems(stage: list[tuple[str, str]]) -> list[str]:
    """The nxdi target: SDK 2.28.1's pip and apt versions, the transformers NxD Inference
    requires (and the `nxdi` extra allows), torch as a CPU pair, LLM_ENGINE=nxdi, `./[nxdi]`."""
    problems = []
    pins = _pins(stage)
    for name, version in {**SDK_2_28_PIP, **TORCH}.items():
        if pins.get(name) != version:
            problems.append(f"{name} {pins.get(name)!r}, SDK 2.28.1 has {version}")
    apt = dockerfile_args_of(stage)
    for name, version in SDK_2_28_APT.items():
        if apt.get(name) != version:
            problems.append(f"{name} {apt.get(name)!r}, SDK 2.28.1 has {version}")
    transformers = pins.get("transformers", "")
    if not Requirement(f"transformers{NXDI_TRANSFORMERS}").specifier.contains(transformers):
        problems.append(f"transformers {transformers!r} is not NxD Inference's {NXDI_TRANSFORMERS}")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = [Requirement(r) for r in extras["optional-dependencies"].get("nxdi", [])]
    for requirement in extra:
        version = {**pins, "transformers": transformers}.get(requirement.name)
        if version and not requirement.specifier.contains(version):
            problems.append(f"the nxdi extra's {requirement} refuses the image's {version}")
    if {r.name for r in extra} < {"transformers", "neuronx-distributed-inference"}:
        problems.append("the nxdi extra does not name transformers and NxD Inference")
    runs = " ".join(arg for keyword, arg in stage if keyword == "RUN")
    if '"./[nxdi]"' not in runs or "[neuron]" in runs or "[cpu]" in runs:
        problems.append("the image does not install the project's nxdi extra (alone)")
    if "download.pytorch.org/whl/cpu" not in runs:
        problems.append("torch from PyPI (CUDA libraries) instead of the CPU index")
    if stage_env(stage).get("LLM_ENGINE") != "nxdi":
        problems.append("LLM_ENGINE is not nxdi")
    return problems


def test_nxdi_image_pins_neuron_sdk_2_28() -> None:
    """The nxdi target installs SDK 2.28.1's versions, a transformers NxD Inference accepts."""
    assert image_problems(_stage("nxdi")) == []


def test_nxdi_image_runs_with_the_rayservice() -> None:
    """Ray as the RayService's rayVersion, Python 3.11 (SDK 2.28's packages: 3.10 to 3.12), the
    Neuron runtime's libraries on the path; `neuron` stays the default (last) target."""
    stage = _stage("nxdi")
    path = REPO / "Dockerfile.serve"
    assert stage[0][1] == "rayproject/ray:${RAY_VERSION}-py311 AS nxdi"
    rayservice = one(rendered("nxdi"), "RayService", RAYSERVICE)
    assert (
        dockerfile_args(path)["RAY_VERSION"] == rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    )
    assert "/opt/aws/neuron/lib" in stage_env(stage)["LD_LIBRARY_PATH"].split(":")
    assert dockerfile_stages(path)[-1][0][1].endswith(" AS neuron")


# The engine tables: a row per engine whose cells name the versions the image pins.
DOC_ROWS: dict[str, list[str]] = {
    "nxdi": [
        "2.28.1",
        SDK_2_28_PIP["neuronx-distributed-inference"],
        "4.57",
    ],
    "neuron": ["2.25", "0.13.1216", "4.47.1"],
}


def table_rows(text: str) -> dict[str, str]:
    """Markdown table rows by their first cell's code span (`neuron`, `nxdi`, ...)."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`([a-z]+)`\s*\|", line)
        if match:
            rows.setdefault(match.group(1), line)
    return rows


def docs_problems(text: str, where: str) -> list[str]:
    """Each engine's row names its SDK, library and transformers versions; nxdi's says prefix
    reuse is off on Inf2 unless documented."""
    problems = []
    rows = table_rows(text)
    for engine, facts in DOC_ROWS.items():
        row = rows.get(engine)
        if row is None:
            problems.append(f"{where}: no `{engine}` row")
            continue
        problems += [f"{where}: `{engine}` row lacks {fact}" for fact in facts if fact not in row]
    if "nxdi" in rows and not PREFIX_CACHING_DOCUMENTED_ON_INF2 and "off" not in rows["nxdi"]:
        problems.append(f"{where}: the `nxdi` row does not say prefix reuse is off")
    return problems


@pytest.mark.parametrize("doc", ["k8s/README.md", "README.md"])
def test_engine_tables_name_what_the_images_pin(doc: str) -> None:
    """k8s/README.md and README.md: which engine, on which SDK, with the pinned versions."""
    assert docs_problems((REPO / doc).read_text(), doc) == []


def _edit_args(edit: Callable[[dict[str, Any]], None]) -> list[str]:
    import yaml

    objects = rendered("nxdi")
    rayservice = one(objects, "RayService", RAYSERVICE)
    config = serve_config(rayservice)
    edit(config["applications"][0]["args"])
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return overlay_problems(rendered("root"), objects)


def _broken_worker_resources() -> list[str]:
    objects = rendered("nxdi")
    worker = one(objects, "RayService", RAYSERVICE)["spec"]["rayClusterConfig"]
    worker["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "aws.amazon.com/neuron"
    ] = "2"
    return overlay_problems(rendered("root"), objects)


def _broken_image(edit: Callable[[list[tuple[str, str]]], list[tuple[str, str]]]) -> list[str]:
    return image_problems(edit(_stage("nxdi")))


def _replace_in_runs(
    old: str, new: str
) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    return lambda stage: [(k, a.replace(old, new) if k == "RUN" else a) for k, a in stage]


BROKEN: dict[str, Callable[[], list[str]]] = {
    "prefix caching on": lambda: _edit_args(lambda args: args.update(prefix_caching=True)),
    "engine neuron": lambda: _edit_args(lambda args: args.update(engine="neuron")),
    "artifacts shared": lambda: _edit_args(
        lambda args: args.update(neuron_artifacts_dir="/data/neuron/artifacts")
    ),
    "another batch size": lambda: _edit_args(lambda args: args.update(max_batch_size=4)),
    "two devices per worker": _broken_worker_resources,
    "NxD Inference of SDK 2.29": lambda: _broken_image(
        _replace_in_runs("inference==0.8.16251", "inference==0.9.17334")
    ),
    "transformers 5": lambda: _broken_image(
        _replace_in_runs("transformers==4.57.6", "transformers==5.24.0")
    ),
    "runtime of SDK 2.25": lambda: _broken_image(
        lambda stage: [
            (k, "NEURON_RUNTIME_LIB=2.27.23.0" if a.startswith("NEURON_RUNTIME_LIB=") else a)
            for k, a in stage
        ]
    ),
    "neuron extra": lambda: _broken_image(_replace_in_runs('"./[nxdi]"', '"./[neuron]"')),
    "docs: SDK 2.31": lambda: docs_problems(
        (REPO / "k8s/README.md").read_text().replace("2.28.1", "2.31.0"), "k8s/README.md"
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_checks_catch_broken_copies(case: str) -> None:
    """Each check reports a deliberately broken copy of the real manifests, image and docs."""
    assert BROKEN[case]() != []
