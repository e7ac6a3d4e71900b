"""llama.cpp's own C++ server (`llama-server`), built from the llama.cpp that the pinned
llama-cpp-python vendors, so that both sides run the same llama.cpp.

`build()` downloads that sdist with pip, then compiles the `llama-server` target with CMake (CPU
only, Release): a few minutes, once. Everything lives under `artifacts/llama-server/VERSION/`
(ignored by git); a later `make bench` finds the binary there and builds nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from backend.engines.llamacpp_runner import single_token_threads
from bench.llamacpp import served
from harness.services import ARTIFACTS, free_port

VERSION = importlib.metadata.version("llama-cpp-python")  # the pin (pyproject.toml)
ROOT = ARTIFACTS / "llama-server" / VERSION
BINARY = ROOT / "build" / "bin" / "llama-server"
LOG = ARTIFACTS / "llama-server.log"


def has_amx() -> bool:
    """Whether this CPU has Intel AMX (ggml's AMX kernels segfault: see
    `backend.engines.llamacpp_runner.model_params`)."""
    with contextlib.suppress(OSError):
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    return False


def cmake_options() -> list[str]:
    """CPU only, Release, the server alone, nothing fetched from the network (no prebuilt web
    UI, no HTTPS), static so the binary stands alone."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ]
    if has_amx():
        # No AMX kernels (they segfault). The vendored ggml/CMakeLists.txt has GGML_AMX_TILE,
        # GGML_AMX_INT8 and GGML_AMX_BF16 (off by default), but they only count without
        # GGML_NATIVE; a native build (the default) takes AMX from -march=native, which the
        # compiler's explicit -mno-amx-* flags override.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        options += [
            "-DGGML_AMX_TILE=OFF",
            "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF",
            f"-DCMAKE_C_FLAGS={no_amx}",
            f"-DCMAKE_CXX_FLAGS={no_amx}",
        ]
    return options


def build() -> Path:
    """The `llama-server` binary of llama-cpp-python VERSION's llama.cpp, built if missing."""
    if BINARY.exists():
        return BINARY
    ROOT.mkdir(parents=True, exist_ok=True)
    sdist = ROOT / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps"]
        subprocess.run([*pip, f"llama-cpp-python=={VERSION}", "-d", str(ROOT)], check=True)
    source = ROOT / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not source.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(ROOT, filter="data")
    venv = Path(sys.executable).parent
    if shutil.which("cmake") is None and not (venv / "cmake").exists():  # from PyPI, into the venv
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja"], check=True)
    cmake = shutil.which("cmake") or str(venv / "cmake")
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(venv))
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    print(f"building llama-server {VERSION} (a few minutes, once): {ROOT}", flush=True)
    build_dir = str(ROOT / "build")
    with (ROOT / "build.log").open("w") as log:
        for command in (
            [cmake, "-S", str(source), "-B", build_dir, *generator, *cmake_options()],
            [cmake, "--build", build_dir, "--target", "llama-server", "-j"],
        ):
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return BINARY


@contextlib.contextmanager
def llama_server(
    gguf_path: Path, *, threads: int, slots: int, slot_context: int, timeout_s: float = 120
) -> Iterator[str]:
    """`llama-server` on `gguf_path` with `slots` slots of `slot_context` tokens each and
    continuous batching; yields its base URL once it answers. Otherwise its defaults, as a user
    would run it (prompt caching, flash attention `auto`, the GGUF's chat template)."""
    port = free_port()
    command = [
        str(build()),
        *("--model", str(gguf_path), "--host", "127.0.0.1", "--port", str(port)),
        # As our engine splits them: a batch of one token on one thread fewer.
        *("--threads", str(single_token_threads(threads)), "--threads-batch", str(threads)),
        *("--parallel", str(slots), "--ctx-size", str(slots * slot_context), "--cont-batching"),
        # Weights loaded as our engine loads them: without extra buffer types where the CPU has
        # AMX (`model_params`), which also skips repacking.
        *(["--no-repack"] if has_amx() else []),
    ]
    with served(command, port, "llama-server", LOG, timeout_s) as url:
        yield url
