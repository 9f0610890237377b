"""Webhook delivery for the simulators: what a CRM does after a change, on a background thread.

A simulator with webhooks (HubSpot, Salesforce outbound messages, Dataverse service endpoints, ConnectWise
callbacks) builds the CRM's own signed requests for a batch of changes (`build`); this sender posts them to the
subscribed URL. Like the real services it delivers at least once, out of order and sometimes late; tests and
`make bench` steer that with `faults`: drop, delay, duplicate or reorder deliveries, deterministically.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from oppsync_pipeline.sandbox.world import SimOpportunity, World


@dataclass(frozen=True)
class Change:
    kind: str  # created | updated | deleted
    opp: SimOpportunity
    seq: int  # the change's order in this sender (event ids are built from it)


@dataclass(frozen=True)
class Outgoing:
    """One HTTP request the CRM sends: `path_and_query` is appended to the subscription's URL."""

    body: bytes
    headers: dict[str, str]
    path_and_query: str = ""
    method: str = "POST"


@dataclass
class DeliveryFaults:
    """What goes wrong on the way, each with a probability (seeded) or for the next `count` deliveries."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay_seconds: float = 0.0  # every delivery waits this long (a slow CRM queue)
    reorder: bool = False  # deliver each batch's requests in reverse order
    seed: int = 0


@dataclass
class WebhookSender:
    world: World
    build: Callable[[list[Change]], list[Outgoing]]
    url: str | None = None  # the subscribed URL; None: nothing is sent (no subscription)
    faults: DeliveryFaults = field(default_factory=DeliveryFaults)
    batch_window: float = 0.05  # changes within this window go out together (HubSpot batches up to 100)
    retries: int = 2  # redeliveries of a failed delivery (5xx, 429, no answer), `retry_seconds` apart and growing
    retry_seconds: float = 0.2
    sent: list[dict[str, Any]] = field(default_factory=list)  # (status, url) of each delivery, for tests
    _queue: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _seq: int = 0
    _thread: threading.Thread | None = field(default=None, repr=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def start(self) -> WebhookSender:
        self.start_faults()
        self.world.listeners.append(self._on_change)
        self._thread = threading.Thread(target=self._run, name=f"webhooks-{self.world.profile.crm}", daemon=True)
        self._thread.start()
        return self

    def start_faults(self) -> None:
        self._rng = random.Random(self.faults.seed)

    def stop(self) -> None:
        if self._on_change in self.world.listeners:
            self.world.listeners.remove(self._on_change)
        self._queue.put(None)

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued change was delivered (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _on_change(self, kind: str, opp: SimOpportunity) -> None:
        if self.url is None:
            return
        self._seq += 1
        self._queue.put(Change(kind, opp, self._seq))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            time.sleep(self.batch_window)
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    self._queue.task_done()
                    break
                batch.append(more)
            try:
                self._deliver(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _deliver(self, batch: list[Change]) -> None:
        outgoing = self.build(batch)
        if self.faults.reorder:
            outgoing = list(reversed(outgoing))
        for request in outgoing:
            if self.faults.delay_seconds:
                time.sleep(self.faults.delay_seconds)
            if self.faults.drop and self._rng.random() < self.faults.drop:
                self.sent.append({"status": "dropped"})
                continue
            copies = 2 if self.faults.duplicate and self._rng.random() < self.faults.duplicate else 1
            for _ in range(copies):
                self._post(request)

    def _post(self, request: Outgoing) -> None:
        """Deliver, retrying a failed delivery a few times (the CRMs retry: Salesforce for 24 h, HubSpot up to 10
        times, Dataverse once); after that the change is left to the sync's schedule, as with the real CRM."""
        url = (self.url or "").rstrip("/") + request.path_and_query
        for attempt in range(1 + self.retries):
            try:
                r = requests.request(request.method, url, data=request.body, headers=request.headers, timeout=10)
                self.sent.append({"status": r.status_code, "url": url, "attempt": attempt})
                if r.status_code < 500 and r.status_code != 429:
                    return  # delivered, or refused for good (a 4xx is not retried by the CRMs either)
            except requests.RequestException as err:
                self.sent.append({"status": "error", "error": type(err).__name__, "attempt": attempt})
            time.sleep(self.retry_seconds * (attempt + 1))
