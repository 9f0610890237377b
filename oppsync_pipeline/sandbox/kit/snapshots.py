"""Result sets held still while a client pages through them, as the real APIs' cursors are.

`QueryCache` answers the same query at the same world version from one evaluation (HubSpot's search and
list, ConnectWise's offset pages, Autotask's query, Salesforce's query). `Snapshots` keeps a first page's
result set under the id its paging token carries (Salesforce's query locator, Dataverse's paging cookie,
Autotask's `paging` parameter), evicting the least recently used; a token whose snapshot is gone makes the
simulator evaluate the query again, as a server restart would.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class QueryCache:
    """Result snapshots for paging, keyed by query and world version (real cursors are snapshots too)."""

    max_entries: int = 64
    _entries: dict[Any, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        value = compute()
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class Snapshots:
    """Paging snapshots by id: `put` a result set (under a new id, or the id a stale token named), `get` it
    back for the next page. `new_id(n)` spells the n-th id in the API's form."""

    def __init__(self, max_entries: int, new_id: Callable[[int], str] = lambda n: f"{n:x}"):
        self.max_entries, self.new_id = max_entries, new_id
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def put(self, value: Any, snap_id: str | None = None) -> str:
        with self._lock:
            snap_id = snap_id or self.new_id(next(self._seq))
            self._entries[snap_id] = value
            self._entries.move_to_end(snap_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return snap_id

    def get(self, snap_id: str | None) -> Any:
        with self._lock:
            if snap_id is None or snap_id not in self._entries:
                return None
            self._entries.move_to_end(snap_id)
            return self._entries[snap_id]
