"""The receiver served for real (uvicorn on a free port, in a thread) so a simulator's webhook sender can reach
it, as the CRM reaches a deployment's receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
import uvicorn

from oppsync_pipeline.lib.config import OppsyncConfig
from oppsync_pipeline.lib.webhooks.app import create_app
from tests.sandbox.test_serve_cli import free_port_base


@contextmanager
def serving_receiver(cfg: OppsyncConfig) -> Iterator[str]:
    """The receiver for `cfg`, listening on 127.0.0.1; yields its base URL."""
    port = free_port_base(1)
    server = uvicorn.Server(
        uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
