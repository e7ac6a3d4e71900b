"""`python -m backend`: the Serve app on a local Ray instance, in the foreground."""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from backend.deployments import build_app
from backend.settings import get_settings


def main() -> None:
    """Start Ray and Serve, deploy the app, and block until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    ray.init(
        include_dashboard=False,
        logging_level=logging.WARNING,
        _metrics_export_port=settings.metrics_port,
    )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(), name="mistral", route_prefix="/")
    print(
        f"backend: serving on http://{settings.host}:{settings.port}, metrics on "
        f"http://127.0.0.1:{settings.metrics_port}/metrics (Ctrl-C stops)",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
