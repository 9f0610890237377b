"""A full sync that outgrows its share of the CRM's quota continues in the next run (issue 21).

Autotask allows 10,000 requests an hour per database, shared by every integration, and a run may spend a share
of it (`quota.run_share`, 0.25 by default). A full read of ~1,000,000 opportunities needs ~6,000 requests with
its dictionaries: it could never finish, and every hourly run started over and was skipped. Where the connector
can resume a set's read from a position (`CrmConnector.resumable_full_reads`), a full read that reaches its
share pauses instead: its staged records stay, and the extract keeps where it stood (`ResumeState`, in
`oppsync.extracts.resume_state`). The connection's next run takes the staged records over and reads on. A read
the CRM fails (a bad page, a refused request) keeps its progress the same way; one the warehouse fails, or that
failed while a page was being staged, does not (what was staged may be short of the position).

Why the records staged so far are exactly those the position leaves out: each page says where the read stands
after it (`Page.position`): its last record's key where the read is one cursor; where it is split into key ranges
read side by side, whose pages interleave, every range's last key taken (Autotask's `ranges:` position), from
which the next run reads each range on. The warehouse does not change until the read completes and is
reconciled as one full sync: records changed while the read paused are read again by the full sync's read of the
changes since it began (on the CRM's clock, from the first run), and its bookmark never passes that beginning. A paused read is discarded, and the next run reads from the start, when the connection's scope or
the mapping changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from oppsync_pipeline.lib.record import MAPPING_VERSION


@dataclass
class ResumeState:
    """Where a paused full read continues, and what its earlier runs had read."""

    started_at: datetime  # the first run's start (our clock): the dictionary entries the read stores carry it
    server_start: datetime | None  # the first run's start on the CRM's clock: changes since then are read again
    open_set: bool | None = True  # the set being read when it paused; None: both sets read, the rest remains
    after: str | None = None  # the connector's position in that set (None: from the set's start)
    seq: int = 0  # staged rows so far (the next page's sequence number)
    counts: dict[str, int] = field(default_factory=lambda: {"open": 0, "closed": 0, "deleted": 0})
    received: dict[str, int] = field(default_factory=dict)  # "open" / "closed": records each full read received
    crm_counts: dict[str, int | None] = field(default_factory=dict)  # the CRM's own count of each set read
    max_modified: datetime | None = None
    runs: int = 0  # runs that read for it and paused
    requests: int = 0  # API requests those runs sent

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=lambda v: v.isoformat())

    @classmethod
    def from_json(cls, text: str) -> ResumeState:
        data: dict[str, Any] = json.loads(text)
        for key in ("started_at", "server_start", "max_modified"):
            if data.get(key):
                data[key] = datetime.fromisoformat(data[key])
        return cls(**data)


def why_not_resumed(paused: dict[str, Any], fingerprint: str | None) -> str | None:
    """Why a paused extract cannot be read on (None: it can): what it staged must be what this run would read."""
    if not paused.get("resume_state"):
        return "it kept no position"
    if paused.get("scope_fingerprint") != fingerprint:
        return "the connection's scope changed since it paused"
    if paused.get("mapping_version") != MAPPING_VERSION:
        return "oppsync's mapping changed since it paused"
    return None
