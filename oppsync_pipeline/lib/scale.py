"""Many connections on one deployment: the hourly schedules spread over a window (not 500 runs at :30).

Each connection's cron minute is moved by an offset taken from a hash of its name: deterministic (the same
connection keeps its minute across restarts and code locations, so its run history stays on the hour it had),
independent of the order of the connections in oppsync.yaml (adding one moves no other), and uniform enough
that 500 connections over 30 minutes give about 17 a minute (make bench, scale).
"""

from __future__ import annotations

import hashlib


def stagger_offset(name: str, spread_minutes: int) -> int:
    """Minutes (0 .. spread_minutes-1) added to connection `name`'s cron minute."""
    if spread_minutes <= 1:
        return 0
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % spread_minutes


def staggered_cron(cron: str, name: str, spread_minutes: int) -> str:
    """`cron` with its minute field moved by the connection's offset (modulo the hour).

    Only a minute field of plain numbers (`30`, `0,30`) moves: `*`, ranges and steps (`*/15`) already say "every
    so often", and moving them would change how often the connection syncs, not when."""
    offset = stagger_offset(name, spread_minutes)
    fields = cron.split()
    if offset == 0 or len(fields) != 5:
        return cron
    minutes = fields[0].split(",")
    if not all(m.isdigit() for m in minutes):
        return cron
    fields[0] = ",".join(str(m) for m in sorted({(int(m) + offset) % 60 for m in minutes}))
    return " ".join(fields)


def effective_spread(configured: int | None, connections: int, auto_above: int, auto_minutes: int) -> int:
    """The spread in minutes: as configured, else (None) none for a small deployment, `auto_minutes` above
    `auto_above` connections."""
    if configured is not None:
        return configured
    return auto_minutes if connections > auto_above else 0
