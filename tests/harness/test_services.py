"""The harness: its waiting returns once a condition holds and says why when it never does; a
service whose start fails in a known passing way is started once more, and only once; a backend
writes its metrics and logs as they happen for tests, as deployed for the bench."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from harness.services import OBSERVED, ServiceProcess, backend_service, free_port, wait_until

# A service that fails its first `FAILURES` starts saying `TRANSIENT`, then answers 200.
FLAKY = """
import http.server, os, pathlib, sys
starts = pathlib.Path(os.environ["STARTS"])
done = len(starts.read_text()) if starts.exists() else 0
starts.write_text("x" * (done + 1))
if done < int(os.environ["FAILURES"]):
    sys.exit("transient: try again")
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Ok).serve_forever()
"""


class Flaky(ServiceProcess):
    transient_start_failure = "transient: try again"


def flaky(tmp_path: Path, failures: int, kind: type[ServiceProcess] = Flaky) -> ServiceProcess:
    (tmp_path / "flaky_service.py").write_text(FLAKY)
    port = free_port()
    env = {
        "PYTHONPATH": str(tmp_path),
        "STARTS": str(tmp_path / "starts"),
        "FAILURES": str(failures),
        "PORT": str(port),
    }
    return kind("flaky", "flaky_service", env, "/", port)


def starts(tmp_path: Path) -> int:
    return len((tmp_path / "starts").read_text())


def test_a_start_that_failed_transiently_is_made_once_more(tmp_path: Path) -> None:
    service = flaky(tmp_path, failures=1)
    service.start(timeout_s=30)
    try:
        assert starts(tmp_path) == 2
    finally:
        service.kill()


def test_only_once_more(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited early"):
        flaky(tmp_path, failures=2).start(timeout_s=30)
    assert starts(tmp_path) == 2


def test_other_failures_are_not_started_again(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited early"):
        flaky(tmp_path, failures=1, kind=ServiceProcess).start(timeout_s=30)
    assert starts(tmp_path) == 1


def test_waiting_ends_when_the_condition_holds() -> None:
    polls = itertools.count()
    wait_until(lambda: next(polls) == 3, 5)
    assert next(polls) == 4


def test_a_wait_that_times_out_says_the_state_it_ended_in() -> None:
    states = itertools.count()
    with pytest.raises(AssertionError, match=r"not met within 0\.2 s: state [1-9]\d*"):
        wait_until(lambda: False, 0.2, lambda: f"state {next(states) + 1}")
    assert next(states) == 1  # asked once, at the end


def test_a_plain_description_is_said_as_it_is() -> None:
    with pytest.raises(AssertionError, match=r"not met within 0\.1 s: two replicas"):
        wait_until(lambda: False, 0.1, "two replicas")


def test_a_backend_is_observed_unless_asked_to_run_as_deployed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in OBSERVED:  # a service's environment starts from this process's
        monkeypatch.delenv(name, raising=False)
    assert OBSERVED.items() <= backend_service(free_port())._env.items()
    deployed = backend_service(free_port(), observed=False, LLM_ENGINE="llamacpp")._env
    assert not OBSERVED.keys() & deployed.keys() and deployed["LLM_ENGINE"] == "llamacpp"
