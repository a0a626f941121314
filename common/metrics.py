"""The Prometheus ``/metrics`` endpoint each service exposes on its own port."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

logger = logging.getLogger(__name__)


def start_metrics_server(host: str, port: int) -> WSGIServer:
    """Serve the default registry at ``http://host:port/metrics`` from a daemon thread.

    Returns the server so that the caller can ``shutdown()`` it on exit.
    """
    server, _thread = start_http_server(port, addr=host)
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
