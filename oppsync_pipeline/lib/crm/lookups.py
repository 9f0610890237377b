"""Dictionary entries a connector keeps between runs (issue 21): companies, contacts, company sites, countries.

An hourly incremental sync reads a few hundred changed opportunities that name a few hundred companies, almost
all of them read by an earlier run. Reading them again every hour is most of what HubSpot, Autotask and
ConnectWise incrementals spent (HubSpot 3.3x, ConnectWise 2.1x the minimum). The connector reads only the ids
the warehouse does not keep (`oppsync.crm_lookups`), and what it reads is stored there.

Staying correct, the rule for every connector:
- a full sync starts from an EMPTY cache and re-reads every entry its records name: the nightly full sync is the
  periodic full refresh (renamed contacts, countries, company sites, and entries no record names any more, which
  it drops: when it completes, the connection's kept entries are what the full sync read);
- an incremental sync starts from the kept entries and, where the CRM has a modified cursor on the dictionary
  (HubSpot companies `hs_lastmodifieddate`, Autotask Companies `lastTrackedModifiedDateTime`, ConnectWise
  companies `_info/lastUpdated`), reads the entries changed since the bookmark first and replaces them, before
  any record is mapped: a renamed company reaches its records on the next hourly sync (each connector also
  re-reads the opportunities of changed companies, which a rename does not touch).

Memory stays flat whatever the tenant's size: a dictionary holds at most RESIDENT_MAX entries in memory. The
connector asks for a page's keys first (`Lookup.load`: those the warehouse keeps come back in one query), what
it reads from the CRM is written to the warehouse in batches, and the entries used least recently leave memory.
A tenant of 1,000,000 HubSpot deals names ~300,000 companies: held whole, they were ~160 MB of the sync's peak,
and an hourly incremental loaded them all before its first request. Small dictionaries read whole (countries)
stay in memory (`whole=True`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import orjson

K = TypeVar("K", int, str)

# Entries a dictionary keeps in memory: above RESIDENT_MAX, what was read is stored and memory keeps the
# RESIDENT_KEEP used last (a company named by many opportunities is asked of the warehouse once in a while,
# not for every page). Connectors map a page from its own copy of its entries (`load`, plus what they read
# from the CRM for it), so what leaves memory never changes a mapping.
RESIDENT_MAX = 40_000
RESIDENT_KEEP = 20_000


def entry_json(value: Any) -> str:
    """An entry as the store keeps it: compact JSON, keys sorted (orjson: ~5x the standard library's speed, and
    an Autotask full sync writes an entry per company and contact it meets; the standard library for what orjson
    refuses: integers past 64 bits, lone surrogates)."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


class LookupStore(Protocol):
    """Where a connection's entries are kept (lib/warehouse/lookups.py): by kind, keys and values as text."""

    def fetch(self, kind: str, keys: Sequence[str] | None) -> dict[str, str]:
        """The JSON values kept for these keys (all of the kind when None) that this run may use."""
        ...

    def store(self, kind: str, entries: Sequence[tuple[str, str]], removed: Sequence[str]) -> None:
        """Replace these entries (key, JSON value) and drop the `removed` keys, in one transaction."""
        ...

    def discard_prefixes(self, kind: str, prefixes: Sequence[str]) -> None:
        """Drop every entry whose key starts with one of `prefixes`."""
        ...

    def finish(self) -> None:
        """The run completed: a full run's entries become all the connection keeps."""
        ...


class Lookup(MutableMapping[K, Any], Generic[K]):
    """One dictionary (e.g. HubSpot companies by id), in memory as far as the run uses it. Iterating and len()
    see the entries in memory only: ask for keys with `load` before testing `in`. Thread-safe: a page's lookups
    may be read ahead in a helper thread while the consumer maps the page before it."""

    def __init__(
        self,
        key_type: type[K],
        kind: str = "",
        store: LookupStore | None = None,
        *,
        kept: bool = False,
        whole: bool = False,
    ):
        self.key_type, self.kind, self._store = key_type, kind, store
        # whether the store holds entries this run may use: the kept ones (incremental), or what this run
        # stored (a full run starts empty and asks the store only once it has put something there)
        self._ask_store = kept
        self._whole = whole
        self._data: OrderedDict[K, Any] = OrderedDict()  # least recently used first
        self._pending: dict[K, str] = {}  # written this run, not stored yet: key -> JSON
        self._removed: set[K] = set()  # dropped this run, not yet from the store
        self._lock = threading.RLock()
        if whole and kept and store is not None:
            self._data.update((key_type(k), json.loads(v)) for k, v in store.fetch(kind, None).items())

    def load(self, keys: Iterable[K]) -> dict[K, Any]:
        """The entries of these keys that the run holds or the warehouse keeps (one query for those not in
        memory): the page's own copy, which `_map` reads, whatever leaves memory meanwhile (other read threads
        load their pages into the same dictionary)."""
        with self._lock:
            page: dict[K, Any] = {}
            wanted = set()
            for k in keys:
                if k in self._data:
                    self._data.move_to_end(k)  # in use again: the last to leave memory
                    page[k] = self._data[k]
                elif k not in self._removed:
                    wanted.add(k)
            if wanted and self._store is not None and self._ask_store and not self._whole:
                for k, v in self._store.fetch(self.kind, [str(k) for k in sorted(wanted)]).items():
                    page[self.key_type(k)] = self._data[self.key_type(k)] = json.loads(v)
                self._trim()
            return page

    def __getitem__(self, key: K) -> Any:
        with self._lock:
            value = self._data[key]
            self._data.move_to_end(key)
            return value

    def __setitem__(self, key: K, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            self._pending[key] = entry_json(value)
            self._removed.discard(key)
            self._trim()

    def __delitem__(self, key: K) -> None:
        with self._lock:
            if key not in self._data and self._store is None:
                raise KeyError(key)
            self._data.pop(key, None)
            self._pending.pop(key, None)
            self._removed.add(key)

    def discard_prefixes(self, prefixes: Iterable[str]) -> None:
        """Drop every entry, in memory and kept, whose key (as text) starts with one of `prefixes`."""
        starts = tuple(prefixes)
        if not starts:
            return
        with self._lock:
            for key in [k for k in self._data if str(k).startswith(starts)]:
                del self._data[key]
            for key in [k for k in self._pending if str(k).startswith(starts)]:
                del self._pending[key]
            if self._store is not None:
                self._store.discard_prefixes(self.kind, starts)

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def flush(self) -> None:
        """Store what this run wrote or dropped since the last flush."""
        with self._lock:
            if self._store is None or not (self._pending or self._removed):
                return
            self._store.store(
                self.kind, [(str(k), v) for k, v in self._pending.items()], [str(k) for k in self._removed]
            )
            self._pending.clear()
            self._removed.clear()
            self._ask_store = True

    def release(self) -> None:
        """Store what this run wrote, then let memory go: a later `load` asks the store (a dictionary read whole
        keeps its entries: it never asks the store for one)."""
        with self._lock:
            self.flush()
            if self._store is not None and not self._whole:
                self._data.clear()

    def _trim(self) -> None:
        if self._store is None or self._whole or len(self._data) <= RESIDENT_MAX:
            return
        self.flush()  # nothing leaves memory before it is stored
        while len(self._data) > RESIDENT_KEEP:
            self._data.popitem(last=False)


class LookupCache:
    """A connection's dictionaries by kind (`companies`, `sites` ...) for one run. `store`: where they are kept
    (None: in memory only, nothing kept); `full`: a full run, which starts empty and whose entries replace the
    connection's kept ones when it completes (`save`); `resumed`: a full run reading on from a paused one, which
    starts from what the paused runs stored (lib/resume.py)."""

    def __init__(self, store: LookupStore | None = None, *, full: bool = True, resumed: bool = False):
        self._store = store
        self._lookups: dict[str, Lookup[Any]] = {}
        self.full = full
        self._kept = not full or resumed

    def lookup(self, kind: str, key_type: type[K], *, whole: bool = False) -> Lookup[K]:
        """`whole`: a small dictionary read whole (countries), kept in memory for the run."""
        if kind not in self._lookups:
            self._lookups[kind] = Lookup(key_type, kind, self._store, kept=self._kept, whole=whole)
        return self._lookups[kind]

    def flush(self) -> None:
        """Store what the run read so far (what is stored stays whatever happens next: every entry is what the
        CRM answered when it was read)."""
        for lookup in self._lookups.values():
            lookup.flush()

    def save(self) -> None:
        """Store the rest of what the run read, when the extract completes: a full run's entries become all the
        connection keeps. Memory keeps none of them: nothing after the extract reads them, and the reconcile comes
        next (it did not lower HubSpot's 1,000,000 peak measurably: the freed objects stay with Python's allocator)."""
        for lookup in self._lookups.values():
            lookup.release()
        if self._store is not None:
            self._store.finish()
