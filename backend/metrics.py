"""Prometheus metrics of the serving path, through Ray's metrics API.

Names follow vLLM's (`vllm:num_requests_running` …) with Ray's spelling: Ray forbids `:` and
prefixes `ray_`, so a vLLM dashboard works after replacing `vllm:` with `ray_vllm_`. Ray exports
them on each node's metrics port (`http://127.0.0.1:8080/metrics` for `python -m backend`), where
KubeRay's usual scraping of the Ray pods collects them.
"""

from __future__ import annotations

from ray.util.metrics import Gauge

_TAGS = ("model_name",)


class ServingMetrics:
    """The metrics of one model replica, labelled with the served model's name."""

    def __init__(self, model_name: str) -> None:
        tags = {"model_name": model_name}
        self._running = Gauge(
            "vllm_num_requests_running",
            description="Requests in the running batch (decoded every step).",
            tag_keys=_TAGS,
        )
        self._waiting = Gauge(
            "vllm_num_requests_waiting",
            description="Requests accepted by the replica, waiting for a batch slot.",
            tag_keys=_TAGS,
        )
        for metric in (self._running, self._waiting):
            metric.set_default_tags(tags)

    def batch_changed(self, running: int, waiting: int) -> None:
        """The batching loop's occupancy (re-set periodically: Ray expires idle gauges)."""
        self._running.set(running)
        self._waiting.set(waiting)
