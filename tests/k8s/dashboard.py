"""The Grafana dashboard's queries and the metric names they use, and the names the backend
exports, derived from the metric definitions in backend/metrics.py and in Ray Serve's source.

Not covered: PromQL beyond the words in PROMQL_WORDS (another function reads as a metric name,
reported as not exported: loudly, not silently), label names and values (the end-to-end test
finds them in a real backend's metrics), and the dashboard's layout.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from tests.k8s.checks import K8S

DASHBOARD = K8S / "components" / "monitoring" / "grafana-dashboard.json"

# PromQL words the dashboard may use besides metric names (functions, modifiers, operators).
PROMQL_WORDS = {
    "by",
    "without",
    "sum",
    "max",
    "min",
    "avg",
    "rate",
    "increase",
    "histogram_quantile",
    "label_values",
}
# Ray prefixes `ray_` to every metric defined through ray.util.metrics and exports a Counter
# with `_total`, a Histogram as its `_bucket`, `_sum` and `_count` series.
_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
# Ray Serve's own metrics the dashboard uses: (defining module in the ray package, the
# definition's name as written there, kind). The HTTP ones are defined per protocol.
RAY_SERVE_METRICS = {
    "serve_deployment_replica_healthy": ("serve/_private/deployment_state.py", "Gauge"),
    "serve_autoscaling_target_replicas": ("serve/_private/deployment_state.py", "Gauge"),
    "serve_num_http_requests": ("serve/_private/request_ingress_metrics.py", "Counter"),
    "serve_num_http_error_requests": ("serve/_private/request_ingress_metrics.py", "Counter"),
}


def load() -> dict[str, Any]:
    """The dashboard JSON."""
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']}",
                query["query"] if isinstance(query, dict) else query,
            )


def words(expr: str) -> set[str]:
    """Identifiers of a PromQL expression outside label matchers, grouping labels, strings,
    ranges and Grafana variables: metric names and PromQL words."""
    stripped = re.sub(r'"[^"]*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", stripped)
    stripped = re.sub(r"\b(by|without)\s*\([^)]*\)", r"\1", stripped)
    stripped = re.sub(r"label_values\(([^,]*),[^)]*\)", r"label_values(\1)", stripped)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped))


def label_names(expr: str) -> set[str]:
    """Labels a PromQL expression matches on or groups by."""
    matchers = re.findall(r"\{([^}]*)\}", expr)
    names = {name for m in matchers for name in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m)}
    names.update(re.findall(r"label_values\([^,]*,\s*(\w+)\s*\)", expr))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names.update(part.strip() for part in grouping.split(",") if part.strip())
    return names


def metric_names(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """Metric names per query; unknown words count as metric names (and must be exported)."""
    return {where: words(expr) - PROMQL_WORDS for where, expr in queries(dashboard)}


class _Recorder:
    """Stands in for ray.util.metrics' classes: records what backend/metrics.py defines."""

    defined: ClassVar[list[tuple[str, str]]] = []

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.defined.append((type(self).kind, name))

    def __getattr__(self, _: str) -> Any:
        return lambda *args, **kwargs: None


def _recorder(kind: str) -> type[_Recorder]:
    return type(kind, (_Recorder,), {"kind": kind})


@functools.cache
def backend_definitions() -> tuple[tuple[str, str], ...]:
    """(kind, name) of every metric backend/metrics.py defines, found by running its code."""
    from backend import metrics

    _Recorder.defined = []
    originals = {kind: getattr(metrics, kind) for kind in _SUFFIXES}
    try:
        for kind in _SUFFIXES:
            setattr(metrics, kind, _recorder(kind))
        metrics._rejections.cache_clear()
        metrics.BatchGauges("m")
        metrics.RequestMetrics("m")
        metrics._rejections()
    finally:
        for kind, cls in originals.items():
            setattr(metrics, kind, cls)
        metrics._rejections.cache_clear()  # the next caller gets a real Counter
    return tuple(_Recorder.defined)


def ray_serve_definitions() -> tuple[tuple[str, str], ...]:
    """(kind, name) of the Ray Serve metrics used, each checked against Ray's source."""
    import ray

    package = Path(ray.__file__).parent
    found = []
    for name, (module, kind) in RAY_SERVE_METRICS.items():
        source = (package / module).read_text()
        spelled = [f'"{name}"', '"' + name.replace("_http_", "_{protocol_name}_") + '"']
        assert any(s in source for s in spelled), f"{name} is not defined in ray/{module}"
        found.append((kind, name))
    return tuple(found)


def exported_names() -> set[str]:
    """The Prometheus series names the backend exports (backend's metrics and Ray Serve's)."""
    return {
        f"ray_{name}{suffix}"
        for kind, name in backend_definitions() + ray_serve_definitions()
        for suffix in _SUFFIXES[kind]
    }
