"""What a CRM's revenue writer provides, and the comparison the engine makes with it.

A writer knows one CRM's write API and seed 000's mapping for it; the engine (engine.py) does the rest the same
way for all five: validate rows, read the CRM's current values, diff, refuse conflicts, write, read back, audit.

  desired(row)          the values the row asks for, by field (pure: no I/O). A field the row leaves None is absent.
  read_current(id)      the CRM's values of the same fields now (absent: the field or its record does not exist
                        yet), and what `write` needs to find its records again (quote id, forecast item ids ...).
  write(id, changes, current)   set `changes` (field -> value), creating records where `current` has none.

Field names are the CRM's own, prefixed with the record they live on where that is not the opportunity
(`quotedetail.priceperunit`, `forecast.Service.revenue`): they are what the diff, the audit log and the
README's mapping table show.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from oppsync_pipeline.lib.crm.http import CrmError
from oppsync_pipeline.lib.writeback.contract import RevenueRow

if TYPE_CHECKING:
    from oppsync_pipeline.lib.crm.base import CrmConnector

# Amounts are compared to the cent: CRMs store currency with 2 decimals (Dynamics cost with 4).
AMOUNT_TOLERANCE = 0.005


@dataclass(frozen=True)
class Target:
    """One CRM field a writer sets, and the input column(s) it comes from (the README's mapping table)."""

    field: str
    source: str
    note: str = ""


@dataclass
class Current:
    """The CRM's current values of a writer's fields (absent: not there yet) and the ids `write` needs."""

    values: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    # Fields the CRM is known to ignore on this record, with the reason (Salesforce's Amount on an opportunity
    # with products): audited `not_applied` without spending a write on them.
    blocked: dict[str, str] = field(default_factory=dict)


class WritePermissionError(CrmError):
    """The API user may read but not write: names the right to grant. Permanent: the row fails, and after a few
    refusals in a row the run stops (a right missing on the object refuses every row; a record shared read-only
    refuses only its own)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message, status, code, permanent=True)


class RevenueWriter(ABC):
    crm: ClassVar[str]
    # seed 000's mapping for this CRM, as written: the README table and the docs are generated from it
    targets: ClassVar[tuple[Target, ...]]
    # the right(s) the API user needs, as the CRM names them (the error for a refused write names them)
    permission: ClassVar[str]

    def __init__(self, connector: CrmConnector):
        self.connector = connector
        self.client = connector.client  # the sync's client: auth, retries, quota budget and statistics

    @abstractmethod
    def desired(self, row: RevenueRow) -> dict[str, Any]:
        """The values `row` asks for, by field; fields whose input is None are left out (not written)."""

    @abstractmethod
    def read_current(self, source_id: str) -> Current:
        """The CRM's current values of the fields `desired` names, read through the API."""

    @abstractmethod
    def write(self, source_id: str, changes: Mapping[str, Any], current: Current) -> None:
        """Write `changes` (a subset of `desired`) to the opportunity `source_id`."""

    def explain(self, err: CrmError) -> CrmError:
        """A refused write as the user should read it: a missing write right names `permission`."""
        if err.status == 403 and not _is_quota(err):
            return WritePermissionError(
                f"{self.crm} refused the write (HTTP 403): the API user lacks write access; grant it "
                f"{self.permission}. CRM said: {err}",
                status=403,
                code=err.code,
            )
        return err


def _is_quota(err: CrmError) -> bool:
    from oppsync_pipeline.lib.crm.http import QuotaExhausted

    return isinstance(err, QuotaExhausted) or (err.code or "") == "REQUEST_LIMIT_EXCEEDED"


def same(a: Any, b: Any) -> bool:
    """Whether a CRM value and a desired value are the same (amounts to the cent, numbers as numbers)."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return _as_bool(a) == _as_bool(b)
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return abs(fa - fb) < AMOUNT_TOLERANCE
    return str(a) == str(b)


def diff(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The fields whose desired value differs from the CRM's (absent fields always differ)."""
    return {f: v for f, v in desired.items() if f not in current or not same(current[f], v)}


def _as_float(v: Any) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _as_bool(v: Any) -> bool | None:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return None if v is None else bool(v)
