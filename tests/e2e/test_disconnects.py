"""Clients that leave: a storm of requests abandoned at random moments, over the real app.

A client that leaves is an ordinary event: the replicas log no traceback for it, and what it
started stops (the model replica frees its slot; nothing is left running in the ingress).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.services import BackendProcess, wait_until

pytestmark = pytest.mark.e2e

REQUESTS = 80
SEED = 20261207
# What a left request would still generate if nobody stopped it: minutes for the whole storm on
# two cores, so the batch emptying within the wait below shows they were stopped.
LEFT_MAX_TOKENS = 400
WHOLE_MAX_TOKENS = 8
# Patterns of a stack in a log: Python's own, asyncio's, and an ASGI server's.
TRACEBACKS = (
    "Traceback (most recent call last)",
    "Task exception was never retrieved",
    "Exception in ASGI application",
)
# Moments to leave at: while sending the body, while waiting for the reply (its first bytes may
# have arrived unread), right after its first byte, while reading a stream, or never (it is
# read whole).
MOMENTS = ("body", "waiting", "first byte", "streaming", "whole")


@dataclass(frozen=True)
class Visit:
    """One request of the storm and when its client leaves."""

    path: str
    stream: bool
    moment: str
    delay_s: float  # how long it waits or reads before leaving
    reset: bool  # leave with a TCP reset rather than a FIN

    @classmethod
    def drawn(cls, rng: random.Random) -> Visit:
        stream = rng.random() < 0.6
        # A whole response's first byte is its last: only streams are left after it.
        moments = MOMENTS if stream else ("body", "waiting", "whole")
        return cls(
            path=rng.choice(("/v1/chat/completions", "/v1/completions")),
            stream=stream,
            moment=rng.choice(moments),
            delay_s=rng.uniform(0, 1.5),
            reset=rng.random() < 0.5,
        )

    def body(self, i: int) -> bytes:
        tokens = WHOLE_MAX_TOKENS if self.moment == "whole" else LEFT_MAX_TOKENS
        request: dict[str, object] = {"max_tokens": tokens, "ignore_eos": True}
        request["stream"] = self.stream
        if self.path == "/v1/completions":
            request["prompt"] = f"Fact number {i} about the sea:"
        else:
            request["messages"] = [{"role": "user", "content": f"Tell me fact {i} about space."}]
        return json.dumps(request).encode()


async def visit(host: str, port: int, visit: Visit, i: int) -> bytes:
    """Send `visit`'s request over a fresh connection and leave at its moment; what was read."""
    body = visit.body(i)
    head = (
        f"POST {visit.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    read = b""
    try:
        if visit.moment == "body":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(visit.delay_s / 4)
            return read
        writer.write(head + body)
        await writer.drain()
        if visit.moment == "waiting":
            await asyncio.sleep(visit.delay_s)
            return read
        read = await asyncio.wait_for(reader.read(1), 120)
        if visit.moment == "streaming":
            deadline = time.monotonic() + visit.delay_s
            while time.monotonic() < deadline and (more := await reader.read(256)):
                read += more
        elif visit.moment == "whole":
            while more := await asyncio.wait_for(reader.read(65536), 120):
                read += more
        return read
    finally:
        if visit.reset and visit.moment != "whole":
            writer.transport.abort()
        else:
            writer.close()


async def storm(url: str, visits: list[Visit]) -> list[bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.gather(*(visit(host, int(port), v, i) for i, v in enumerate(visits)))


class LogTail:
    """What the backend's Ray Serve logs (its replicas', its proxy's, its workers' stderr) got
    after this was made."""

    def __init__(self, session: Path) -> None:
        self._logs = session / "logs"
        self._start = {path: path.stat().st_size for path in self._paths()}

    def _paths(self) -> list[Path]:
        return sorted([*self._logs.glob("serve/*.log"), *self._logs.glob("worker-*.err")])

    def new(self) -> dict[Path, str]:
        tails = {}
        for path in self._paths():
            with path.open("rb") as log:
                log.seek(self._start.get(path, 0))
                tails[path] = log.read().decode(errors="replace")
        return tails


def idle(backend: BackendProcess) -> bool:
    """The model replica runs and queues no request, and no replica is handling one."""
    return (
        backend.metric("ray_vllm_num_requests_running") == 0
        and backend.metric("ray_vllm_num_requests_waiting") == 0
        and not backend.metric("ray_serve_replica_processing_queries", deployment="model")
        and not backend.metric("ray_serve_replica_processing_queries", deployment="ingress")
    )


def test_clients_that_leave_log_no_traceback_and_leave_nothing_running(
    backend: BackendProcess,
) -> None:
    rng = random.Random(SEED)
    visits = [Visit.drawn(rng) for _ in range(REQUESTS)]
    assert {v.moment for v in visits} == set(MOMENTS)
    logs = LogTail(backend.session_dir())

    replies = asyncio.run(storm(backend.url, visits))
    # Not a fixed sleep: generations left behind would run for minutes, so emptying this fast
    # shows they were stopped.
    wait_until(lambda: idle(backend), 60, "the replicas are idle after the storm")

    read_whole = [
        (v, reply) for v, reply in zip(visits, replies, strict=True) if v.moment == "whole"
    ]
    assert read_whole and all(reply.startswith(b"HTTP/1.1 200") for _, reply in read_whole)
    streamed = [reply for v, reply in read_whole if v.stream]
    assert all(b"data: [DONE]" in reply for reply in streamed)  # (chunked: a 0-chunk follows)
    tails = logs.new()
    stacks = {
        f"{path.name}: {pattern}": text.count(pattern)
        for path, text in tails.items()
        for pattern in TRACEBACKS
        if pattern in text
    }
    assert stacks == {}, stacks
    ingress = "".join(text for path, text in tails.items() if "_ingress_" in path.name)
    left = sum(v.moment != "whole" for v in visits)
    # One line each (a client that leaves before its body reached the ingress gets none there).
    assert 0 < ingress.count("client left") <= left, ingress
