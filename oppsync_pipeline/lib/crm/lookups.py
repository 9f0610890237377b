"""Dictionary entries a connector keeps between runs (issue 21): companies, contacts, company sites, countries.

An hourly incremental sync reads a few hundred changed opportunities that name a few hundred companies, almost
all of them read by an earlier run. Reading them again every hour is most of what HubSpot, Autotask and
ConnectWise incrementals spent (HubSpot 3.3x, ConnectWise 2.1x the minimum). The sync hands each connector the
entries the warehouse kept (`oppsync.crm_lookups`), the connector reads only the ids it does not know, and the
sync stores what it read when the extract completes (lib/sync.py).

Staying correct, the rule for every connector:
- a full sync starts from an EMPTY cache and re-reads every entry its records name: the nightly full sync is the
  periodic full refresh (renamed contacts, countries, company sites, and entries no record names any more, which
  it drops: the connection's cache is replaced by what the full sync read);
- an incremental sync starts from the kept entries and, where the CRM has a modified cursor on the dictionary
  (HubSpot companies `hs_lastmodifieddate`, Autotask Companies `lastTrackedModifiedDateTime`, ConnectWise
  companies `_info/lastUpdated`), reads the entries changed since the bookmark first and replaces them, before
  any record is mapped: a renamed company reaches its records on the next hourly sync (each connector also
  re-reads the opportunities of changed companies, which a rename does not touch).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from typing import Any, Generic, TypeVar

K = TypeVar("K", int, str)


class Lookup(MutableMapping[K, Any], Generic[K]):
    """One dictionary (e.g. HubSpot companies by id): a dict that remembers which keys were written this run.
    Keys are stored as text in the warehouse and given back as `key_type`; values must be JSON-serialisable."""

    def __init__(self, key_type: type[K], entries: dict[str, Any] | None = None):
        self.key_type = key_type
        self._data: dict[K, Any] = {key_type(k): v for k, v in (entries or {}).items()}
        self.written: set[K] = set()
        self.removed: set[K] = set()  # kept entries dropped this run (stale): removed from the warehouse too

    def __getitem__(self, key: K) -> Any:
        return self._data[key]

    def __setitem__(self, key: K, value: Any) -> None:
        self._data[key] = value
        self.written.add(key)
        self.removed.discard(key)

    def __delitem__(self, key: K) -> None:
        del self._data[key]
        self.written.discard(key)
        self.removed.add(key)

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data


class LookupCache:
    """The connection's kept dictionaries by kind (`companies`, `sites` ...), as the warehouse held them when
    the run began. `full` marks a cache that replaces the connection's kept entries when saved (a full sync's);
    otherwise only the entries written this run are stored (upserted)."""

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None, *, full: bool = True):
        self._loaded = entries or {}
        self._lookups: dict[str, Lookup[Any]] = {}
        self.full = full

    def lookup(self, kind: str, key_type: type[K]) -> Lookup[K]:
        if kind not in self._lookups:
            self._lookups[kind] = Lookup(key_type, self._loaded.pop(kind, None))
        return self._lookups[kind]

    def to_remove(self) -> Iterator[tuple[str, str]]:
        """(kind, key) of the kept entries an incremental run dropped (a full cache replaces them all)."""
        for kind, lookup in self._lookups.items():
            for key in lookup.removed:
                yield kind, str(key)

    def to_save(self) -> Iterator[tuple[str, str, str]]:
        """(kind, key, JSON value) of what the warehouse must store: every entry of a full cache, else the
        entries written this run."""
        for kind, lookup in self._lookups.items():
            keys = lookup.keys() if self.full else lookup.written
            for key in keys:
                yield kind, str(key), json.dumps(lookup[key], separators=(",", ":"), sort_keys=True, default=str)
