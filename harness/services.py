"""Real services for end-to-end tests, started as processes the way users start them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from playwright.sync_api import Browser, Playwright
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
# Debian's Chromium; the flags keep it off the network this machine does not have.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BOT = "#chatbot [data-testid='bot']"


def launch_chromium(playwright: Playwright) -> Browser:
    """Headless Debian Chromium (never a browser downloaded by Playwright)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A service started as a subprocess, logged to `artifacts/`, stopped with SIGINT."""

    def __init__(self, name: str, module: str, env: dict[str, str], ready_path: str, port: int):
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self._module = module
        self._env = {**os.environ, **env}
        self._ready_path = ready_path
        self._log = ARTIFACTS / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The service's process id (it must be running)."""
        assert self._process is not None
        return self._process.pid

    # A start that fails saying this in its log is made once more (None: never).
    transient_start_failure: str | None = None

    def start(self, timeout_s: float = 240) -> None:
        """Start the process and wait until `ready_path` answers 200; a start that failed with
        `transient_start_failure` is made once more, after its leftovers are killed."""
        ARTIFACTS.mkdir(exist_ok=True)
        logged = self._log.stat().st_size if self._log.exists() else 0
        try:
            self._start(timeout_s)
        except RuntimeError:
            with self._log.open("rb") as lines:
                lines.seek(logged)
                said = lines.read().decode(errors="replace")
            if not self.transient_start_failure or self.transient_start_failure not in said:
                raise
            self._kill_session()
            self._start(timeout_s)

    def _start(self, timeout_s: float) -> None:
        log = self._log.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", self._module],
            cwd=REPO,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self._log}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready after {timeout_s} s")

    def stop(self) -> None:
        """Interrupt like Ctrl-C, then make sure the whole process group is gone."""
        if self._process is None or self._process.poll() is not None:
            return
        group = os.getpgid(self._process.pid)
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self._process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # stragglers (Ray workers) of this service only

    def kill(self) -> None:
        """SIGKILL every process of the service's session at once (Ray's workers run in other
        process groups of it): for teardowns, where no orderly shutdown is under test."""
        if self._process is None or self._process.poll() is not None:
            return
        self._kill_session()
        self._process.wait()

    def _kill_session(self) -> None:
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.kill()

    def processes(self) -> list[psutil.Process]:
        """Every process of the service's session (Ray's own among them), `cmdline` read; the
        service leads its session (its id is the session's), so this holds after it exits."""
        return [
            process
            for process in psutil.process_iter(["cmdline"])
            if _session_of(process.pid) == self.pid
        ]


class BackendProcess(ServiceProcess):
    """The backend, with its Prometheus endpoint (Ray's metrics export port)."""

    # Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py), which a busy
    # two-core machine starting another cluster beside can pass: one more start then.
    transient_start_failure = "The current node timed out during startup"

    def __init__(self, port: int, metrics_port: int, env: dict[str, str]) -> None:
        super().__init__("backend", "backend", env, "/healthz", port)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def health(self) -> int:
        """The status `/healthz` answers now."""
        return httpx.get(self.url + "/healthz", timeout=10).status_code

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of a sample's values over the series with `labels`; None if none exported."""
        text = httpx.get(self.metrics_url, timeout=5).text
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]
        return sum(values) if values else None

    def session_dir(self) -> Path:
        """The Ray session directory of this backend's cluster (its `logs/` hold Serve's logs):
        named on the command line of Ray's own processes, which share the backend's session."""
        for process in self.processes():
            for arg in process.info["cmdline"] or ():
                if arg.startswith("--session-dir="):
                    return Path(arg.removeprefix("--session-dir="))
        raise LookupError("no Ray process of the backend names its session directory")


def kill_model_replica(backend: ServiceProcess) -> None:
    """SIGKILL the backend's model replica (as the kernel's OOM killer would); Ray replaces it."""
    replicas = [
        process
        for process in backend.processes()
        if "ServeReplica:" in " ".join(process.info["cmdline"] or ())
        and ":model" in " ".join(process.info["cmdline"] or ())
    ]
    assert replicas, "the backend runs no model replica"
    for process in replicas:
        process.kill()


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


# What tests read sooner than Ray's defaults write it. Each costs the backend's processes CPU
# beside the model's, so the bench, which reads neither, runs without (as deployed).
OBSERVED = {
    # Ray pushes metrics to its exporter every 10 s by default; tests read them sooner.
    "RAY_metrics_report_interval_ms": "500",
    # Throughput-optimised Serve buffers 1000 request-path log records before writing them;
    # tests read the replicas' logs as they happen.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def backend_service(port: int, *, observed: bool = True, **overrides: str) -> BackendProcess:
    """The real backend, like `make serve`: the embedded model unless `overrides` (env) say;
    `observed`, its metrics and request logs written as they happen (`OBSERVED`)."""
    metrics_port = free_port()
    env = {
        "LLM_PORT": str(port),
        "LLM_METRICS_PORT": str(metrics_port),
        "LLM_MAX_BATCH_SIZE": "8",
        # Requests that set no max_tokens (`/infer`) stay short on a slow or busy machine.
        "LLM_DEFAULT_MAX_TOKENS": "64",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # as `make serve` runs it (see the Makefile)
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
        "HF_HUB_OFFLINE": "1",
        **(OBSERVED if observed else {}),
        **overrides,
    }
    return BackendProcess(port, metrics_port, env)


def wait_until(
    condition: Callable[[], bool], timeout_s: float = 90, what: str | Callable[[], str] = ""
) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`, saying `what` (or what it
    returns then: the state the wait ended in)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not met within {timeout_s} s: {said or condition}")
        time.sleep(0.05)


def ui_service(port: int, backend_url: str, **settings: str) -> ServiceProcess:
    """The real chat UI (`python -m chatui`) talking to `backend_url`; extra `CHATUI_*` settings."""
    env = {
        "CHATUI_PORT": str(port),
        "CHATUI_BACKEND_URL": backend_url,
        "GRADIO_ANALYTICS_ENABLED": "False",
        **{f"CHATUI_{key.upper()}": value for key, value in settings.items()},
    }
    return ServiceProcess("ui", "chatui", env, "/", port)
