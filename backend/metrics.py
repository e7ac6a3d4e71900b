"""Prometheus metrics of the serving path, through Ray's metrics API.

Names follow vLLM's where one exists, in Ray's spelling: Ray forbids `:` and prefixes `ray_`, so
`vllm:time_to_first_token_seconds` is exported as `ray_vllm_time_to_first_token_seconds` and a
vLLM dashboard works after replacing `vllm:` with `ray_vllm_`. Ray serves them on each node's
metrics port (`http://127.0.0.1:8080/metrics` for `python -m backend`), where KubeRay's usual
scraping of the Ray pods collects them. Every series has the label `model_name`.
"""

from __future__ import annotations

import functools
import time
from typing import Any, TypeVar

from ray.util.metrics import Counter, Gauge, Histogram

from backend.generation import Delta

# vLLM's bucket boundaries (vllm/engine/metrics.py), in seconds.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
_TTFT_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
_ITL_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
_E2E_BUCKETS += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

_MODEL = ("model_name",)


MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


def _per_model(
    kind: type[MetricT], name: str, description: str, model_name: str, **options: Any
) -> MetricT:
    """A metric whose every series carries `model_name`."""
    metric = kind(name, description=description, tag_keys=_MODEL, **options)
    metric.set_default_tags({"model_name": model_name})
    return metric


class BatchGauges:
    """Occupancy of one replica's batching loop."""

    def __init__(self, model_name: str) -> None:
        self._running = _per_model(
            Gauge,
            "vllm_num_requests_running",
            "Requests in the running batch (decoded every step).",
            model_name,
        )
        self._waiting = _per_model(
            Gauge,
            "vllm_num_requests_waiting",
            "Requests accepted by the replica, waiting for a batch slot.",
            model_name,
        )
        self._kv_usage = _per_model(
            Gauge,
            "vllm_kv_cache_usage_perc",
            "KV-cache usage by running requests: 1 means 100 percent.",
            model_name,
        )
        self._preemptions = _per_model(
            Counter,
            "vllm_num_preemptions",
            "Running requests sent back to be computed again: KV memory ran short.",
            model_name,
        )

    def batch_changed(self, running: int, waiting: int, kv_usage: float) -> None:
        """The batching loop's occupancy (re-set periodically: Ray expires idle gauges)."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_usage.set(kv_usage)

    def preempted(self) -> None:
        """One running request preempted."""
        self._preemptions.inc()


class RequestMetrics:
    """Latencies, token counts and outcomes of the requests one process serves."""

    def __init__(self, model_name: str) -> None:
        self._model = model_name
        self.ttft = _per_model(
            Histogram,
            "vllm_time_to_first_token_seconds",
            "From the request reaching the model server to its first token.",
            model_name,
            boundaries=_TTFT_BUCKETS,
        )
        self.itl = _per_model(
            Histogram,
            "vllm_inter_token_latency_seconds",
            "Between two tokens of one stream.",
            model_name,
            boundaries=_ITL_BUCKETS,
        )
        self.e2e = _per_model(
            Histogram,
            "vllm_e2e_request_latency_seconds",
            "From the request reaching the model server to its last token.",
            model_name,
            boundaries=_E2E_BUCKETS,
        )
        self.prompt_tokens = _per_model(
            Counter, "vllm_prompt_tokens", "Prompt tokens of accepted requests.", model_name
        )
        self.generation_tokens = _per_model(
            Counter, "vllm_generation_tokens", "Tokens generated.", model_name
        )
        self.prefix_queries = _per_model(
            Counter,
            "vllm_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (every accepted prompt).",
            model_name,
        )
        self.prefix_hits = _per_model(
            Counter,
            "vllm_prefix_cache_hits",
            "Prompt tokens resumed from the prefix cache instead of being computed.",
            model_name,
        )
        self.finished = Counter(
            "vllm_request_success",
            description="Finished requests by reason: stop, length, abort (the client left).",
            tag_keys=(*_MODEL, "finished_reason"),
        )

    def track(self, prompt_tokens: int) -> RequestTracker:
        """Start timing one accepted request."""
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_queries.inc(prompt_tokens)
        return RequestTracker(self)

    def reject(self, reason: str) -> None:
        """A request refused before its first token."""
        count_rejection(self._model, reason)

    def finish(self, reason: str) -> None:
        """A request ended: `stop`, `length` or `abort`."""
        self.finished.inc(tags={"model_name": self._model, "finished_reason": reason})


@functools.cache
def _rejections() -> Counter:
    return Counter(
        "chat_requests_rejected",
        description="Requests refused before generating: invalid, not_found, overloaded.",
        tag_keys=(*_MODEL, "reason"),
    )


def count_rejection(model_name: str, reason: str) -> None:
    """A request refused before generating (no vLLM counterpart: our own name)."""
    _rejections().inc(tags={"model_name": model_name, "reason": reason})


class RequestTracker:
    """The clock of one request: time to first token, gaps between tokens, end to end."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self._metrics = metrics
        self._start = time.monotonic()
        self._last: dict[int, float] = {}  # each choice's last token: gaps are within a choice

    def cached(self, count: int) -> None:
        """`count` prompt tokens were resumed from the prefix cache."""
        if count > 0:
            self._metrics.prefix_hits.inc(count)

    def tokens(self, delta: Delta) -> None:
        """A delta arrived: its tokens are timed when they were sampled (on arrival when the
        engine does not say), so merging deltas for delivery changes no latency."""
        if delta.tokens <= 0:
            return
        times = delta.token_times or (time.monotonic(),) * delta.tokens
        for produced in times:
            if delta.index in self._last:
                self._metrics.itl.observe(produced - self._last[delta.index])
            elif not self._last:  # the request's first token, of whichever choice
                self._metrics.ttft.observe(produced - self._start)
            self._last[delta.index] = produced
        self._metrics.generation_tokens.inc(delta.tokens)

    def finished(self, reason: str) -> None:
        """The request ended with `reason`."""
        if reason != "abort":
            self._metrics.e2e.observe(time.monotonic() - self._start)
        self._metrics.finish(reason)
