"""CrmSession: the environment's proxy and CA bundle settings read once per host, applied as requests applies them.

requests reads them before every request it sends (~110 us each here, walking the environment twice); a ConnectWise
full sync sends one request per opportunity. The settings must still take effect exactly as a plain Session's."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import pytest
import requests

from oppsync_pipeline.lib.crm import http as crm_http
from oppsync_pipeline.lib.crm.http import CrmSession

ENVIRONMENTS = [
    {},
    {"HTTP_PROXY": "http://proxy.example:3128", "HTTPS_PROXY": "http://secure-proxy.example:3128"},
    {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "crm.example,.internal"},
    {"https_proxy": "http://p:1", "no_proxy": "*"},
    {"ALL_PROXY": "socks5://p:1080", "NO_PROXY": "127.0.0.1"},
    {"REQUESTS_CA_BUNDLE": "/etc/ssl/corp.pem"},
    {"CURL_CA_BUNDLE": "/etc/ssl/curl.pem", "HTTPS_PROXY": "http://p:1"},
]
URLS = [
    "https://crm.example/api/v1/opportunities?page=2",
    "https://eu1.api.internal/v4/sales",
    "http://127.0.0.1:8080/x",
    "http://crm.example:8443/y",
]
# (proxies, stream, verify, cert) a request may give, over what the session holds
ARGUMENTS = [
    ({}, None, None, None),
    ({"no_proxy": "crm.example"}, None, None, None),
    ({"https": "http://explicit:9"}, True, False, "/tmp/client.pem"),
    (None, None, "/etc/ssl/mine.pem", None),
]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.mark.parametrize("environment", ENVIRONMENTS, ids=lambda e: ",".join(e) or "none")
def test_settings_are_those_a_plain_session_takes_from_the_environment(
    clean_environment: pytest.MonkeyPatch, environment: dict[str, str]
):
    for name, value in environment.items():
        clean_environment.setenv(name, value)
    ours = CrmSession()
    for session_proxies in ({}, {"http": "http://session-proxy:8"}):
        for trust_env in (True, False):
            plain = requests.Session()
            plain.proxies, ours.proxies = dict(session_proxies), dict(session_proxies)
            plain.trust_env = ours.trust_env = trust_env
            for url in URLS:
                for proxies, stream, verify, cert in ARGUMENTS * 2:  # twice: the second from what was read
                    expected = plain.merge_environment_settings(
                        url, None if proxies is None else dict(proxies), stream, verify, cert
                    )
                    got = ours.merge_environment_settings(
                        url, None if proxies is None else dict(proxies), stream, verify, cert
                    )
                    assert got == expected, (url, proxies, trust_env)


def test_the_environment_is_read_once_per_host(clean_environment: pytest.MonkeyPatch):
    clean_environment.setenv("HTTPS_PROXY", "http://p:1")
    session = CrmSession()
    with mock.patch.object(crm_http, "get_environ_proxies", wraps=crm_http.get_environ_proxies) as read:
        for page in range(5):
            session.merge_environment_settings(f"https://crm.example/api?page={page}", {}, None, None, None)
        assert read.call_count == 1
        session.merge_environment_settings("https://login.example/token", {}, None, None, None)
        session.merge_environment_settings("http://crm.example/api", {}, None, None, None)  # another scheme
        assert read.call_count == 3


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"server": self.server.name, "target": self.path}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[dict[str, str]]:
    """Two local HTTP servers: one stands for a forward proxy (it answers whatever it is asked, naming the target
    it was given), one for the CRM."""
    running = {}
    for name in ("proxy", "crm"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        running[name] = server
    yield {name: f"http://127.0.0.1:{s.server_address[1]}" for name, s in running.items()}
    for server in running.values():
        server.shutdown()
        server.server_close()


def test_requests_go_through_the_proxy_the_environment_names_and_around_it_for_no_proxy(
    clean_environment: pytest.MonkeyPatch, servers: dict[str, str]
):
    clean_environment.setenv("HTTP_PROXY", servers["proxy"])
    session = CrmSession()
    for _ in range(2):
        through = session.get("http://crm.invalid/sales/opportunities?page=1", timeout=10).json()
        assert through == {"server": "proxy", "target": "http://crm.invalid/sales/opportunities?page=1"}
    clean_environment.setenv("NO_PROXY", "127.0.0.1")
    direct = CrmSession().get(f"{servers['crm']}/sales", timeout=10).json()
    assert direct == {"server": "crm", "target": "/sales"}
