"""Issued bearer tokens and their expiry, on one clock per API.

HubSpot's OAuth tokens expire on the world's virtual clock (advancing it 1801 s expires a 1800 s token, as
tests/sandbox/test_hubspot_sandbox.py::test_bad_token_and_oauth_expiry checks). Dataverse's Entra tokens run
on real time: tests/sandbox/test_dynamics_sandbox.py::test_change_tracking_delta_links_and_deleted_entities
moves the virtual clock 8 days and then expects the delta token's 400 from a session whose bearer token was
issued before, so a virtual-clock expiry (3599 s) would answer 401 instead. Salesforce's session ids do not
expire by time in the sandbox (`seconds=None`). `expire_all` is the `token_expiry` fault for all three.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta


class TokenStore:
    def __init__(self, now: Callable[[], datetime], seconds: float | None = None):
        self.now, self.seconds = now, seconds
        self._expiry: dict[str, datetime | None] = {}
        self._lock = threading.Lock()

    def issue(self, token: str) -> str:
        with self._lock:
            self._expiry[token] = None if self.seconds is None else self.now() + timedelta(seconds=self.seconds)
        return token

    def known(self, token: str | None) -> bool:
        """Issued here (valid or expired)."""
        with self._lock:
            return bool(token) and token in self._expiry

    def expired_for(self, token: str | None) -> timedelta | None:
        """None while `token` is valid; how long ago it expired otherwise (an unknown token: forever)."""
        with self._lock:
            if not token or token not in self._expiry:
                return timedelta.max
            expiry = self._expiry[token]
        now = self.now()
        return None if expiry is None or now < expiry else now - expiry

    def valid(self, token: str | None) -> bool:
        return self.expired_for(token) is None

    def expire_all(self) -> None:
        """Every issued token expires now (the token_expiry fault: expiry mid-paging)."""
        with self._lock:
            past = self.now() - timedelta(seconds=1)
            for token, expiry in self._expiry.items():
                self._expiry[token] = past if expiry is None else min(expiry, past)

    def __iter__(self):
        with self._lock:
            return iter(list(self._expiry))
