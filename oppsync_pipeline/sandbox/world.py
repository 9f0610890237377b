"""The sandbox's data: one tenant per CRM, generated deterministically from a seed, with a virtual clock
and realistic activity over time.

The world is CRM-neutral (users, accounts, stages, opportunities); each simulator renders it in its CRM's
own shape and writes back through its CRM's own endpoints. Records use __slots__ so a million
opportunities fit in a few hundred MB.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Clock:
    """Virtual UTC time: real time shifted forward by `advance`, so it never goes back, across restarts
    too, as a real CRM's clock does not. `start` is the anchor the tenant's data was generated relative
    to (earlier than now when a restarted sandbox regenerates the same tenant). Timestamps are truncated
    to the CRM's precision so that, as in the real APIs, many records share one timestamp."""

    def __init__(self, start: datetime | None = None, precision: timedelta = timedelta(seconds=1)):
        self._start_virtual = start or utcnow().replace(microsecond=0)
        self._offset = timedelta()
        self._lock = threading.Lock()
        self.precision = precision

    def now(self) -> datetime:
        with self._lock:
            t = max(utcnow(), self._start_virtual) + self._offset
        return truncate(t, self.precision)

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._offset += delta

    @property
    def start(self) -> datetime:
        """The anchor: generated data is relative to it, so the same seed and anchor give the same tenant."""
        return self._start_virtual


def truncate(t: datetime, precision: timedelta) -> datetime:
    us = int(precision / timedelta(microseconds=1))
    epoch = datetime(1970, 1, 1)
    return epoch + timedelta(microseconds=(int((t - epoch) / timedelta(microseconds=1)) // us) * us)


@dataclass(slots=True)
class SimUser:
    idx: int
    native_id: str
    name: str
    email: str
    kind: str = "user"  # user | team (Dataverse owners can be teams)
    active: bool = True
    alt_id: str | None = None  # HubSpot: the user id behind an owner (hs_created_by_user_id refers to it)


@dataclass(slots=True)
class SimAccount:
    idx: int
    native_id: str
    name: str
    street: str | None
    city: str | None
    state: str | None
    postal_code: str | None
    country: str | None
    site_id: str | None = None  # ConnectWise company site
    site_name: str | None = None
    # When the account itself last changed (a rename): it does not move its opportunities' change cursor, in
    # any of the five CRMs; a connector that shows the client's name must ask for changed accounts too.
    modified_at: datetime | None = None


@dataclass(slots=True)
class SimStage:
    key: str  # what the opportunity carries (stage name, stage id, status id ...)
    label: str
    is_closed: bool
    is_won: bool
    probability: float  # 0-100
    order: int
    pipeline: str = "default"


# Exchange rates every simulated tenant converts with: units of the currency per one unit of the org's base
# currency (USD), the convention of Dataverse's `exchangerate`, HubSpot's and Salesforce's currency settings
# ("1 USD = 0.92 EUR"). The base amount is the amount divided by the rate.
BASE_CURRENCY = "USD"
EXCHANGE_RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79}


def to_base(amount: float | None, currency: str | None) -> float | None:
    """`amount` in the base currency, rounded as the CRMs store money (4 decimals); None stays None."""
    if amount is None:
        return None
    return round(amount / EXCHANGE_RATES.get(currency or BASE_CURRENCY, 1.0), 4)


@dataclass(slots=True)
class SimOpportunity:
    native_id: str
    seq: int
    name: str
    account: int | None
    owner: int
    creator: int
    stage: str
    amount: float | None
    currency: str
    probability: float | None
    close_date: date | None
    created_at: datetime
    modified_at: datetime
    deleted_at: datetime | None = None
    extra: dict[str, Any] | None = None  # custom fields and anything written that the world does not model
    # The sales stage, where the CRM keeps it apart from the status the world's `stage` models (ConnectWise
    # stage vs status, Autotask stage vs status, Dataverse business-process stage vs statuscode).
    sales_stage: str | None = None
    # When the opportunity entered its current closed status (won / lost); None while open. What the CRM
    # exposes as its close time (Dataverse actualclosedate, ConnectWise / Autotask closedDate, HubSpot
    # hs_closed_won_date / hs_closed_lost_date, Salesforce LastStageChangeDate / CloseDate).
    closed_at: datetime | None = None


@dataclass
class TenantProfile:
    """What makes one CRM's tenant look like that CRM: stages, id formats, currencies."""

    crm: str
    stages: list[SimStage]
    opportunity_id: Callable[[int], str]
    user_id: Callable[[int], str]
    account_id: Callable[[int], str]
    currencies: tuple[str, ...] = ("USD", "EUR", "GBP")
    precision: timedelta = timedelta(seconds=1)
    team_owners: int = 0  # how many owners are teams (Dataverse)
    users: int = 25
    accounts_per_opportunity: float = 0.3
    # Sales stages kept apart from `stages` (which then are the CRM's statuses), in the CRM's order; the last
    # one flagged is_won is where won opportunities stand. None: the stage is the status (Salesforce, HubSpot).
    sales_stages: list[SimStage] | None = None


FIRST = [
    "Dana",
    "Ana",
    "José",
    "Zoë",
    "Liam",
    "Chloé",
    "Noah",
    "Björn",
    "Mia",
    "Ōta",
    "Sven",
    "Priya",
    "O'Neil",
    "Fatima",
    "Kai",
    "Léa",
    "Ivan",
    "Jürgen",
    "Aiko",
    "Sam",
]
LAST = [
    "Rep",
    "Müller",
    "O'Brien",
    "Nakamura",
    "García",
    "Smith",
    "Dubois",
    "Kowalski",
    "Chen",
    "Okafor",
    "Johansson",
    "Rossi",
    "Nguyen",
    "Patel",
    "D'Angelo",
    "Schäfer",
]
COMPANY = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Müller & Söhne",
    "O'Reilly Parts",
    "Stark; Industries",
    'Wayne "Enterprises"',
    "Hooli",
    "Zürich Datenwerk",
    "Ōkami KK",
    "Soylent",
    "Tyrell",
    "Cyberdyne",
    "Vandelay Imports",
    "Pied Piper",
    "Nordström AB",
    "Société Générale d'Essai",
]
SUFFIX = ["Corp", "GmbH", "Ltd", "Inc.", "SA", "AB", "KK", "LLC"]
DEAL = [
    "500 seats",
    "Renewal",
    "Managed Services",
    "Phase 2",
    "Firewall refresh",
    "M365 migration",
    "Backup & DR",
    'Helpdesk "Gold"',
    "VoIP rollout; 3 sites",
    "Ünified comms",
    "SOC 2 audit",
    "Cloud lift",
]
CITIES = [
    ("Austin", "TX", "78701", "USA"),
    ("München", None, "80331", "Germany"),
    ("London", None, "EC1A", "UK"),
    ("Lyon", None, "69001", "France"),
    ("Tokyo", None, "100-0001", "Japan"),
    ("Denver", "CO", "80202", "USA"),
]


class World:
    """One CRM tenant. All mutation goes through methods that take the lock and bump `version`."""

    def __init__(self, profile: TenantProfile, seed: int = 42, opportunities: int = 1000, clock: Clock | None = None):
        self.profile = profile
        self.seed = seed
        self.rng = random.Random(f"{profile.crm}:{seed}")
        self.clock = clock or Clock(precision=profile.precision)
        self.clock.precision = profile.precision  # a shared or injected clock still ticks like this CRM
        self.lock = threading.RLock()
        self.version = 0
        self.stages: dict[str, SimStage] = {s.key: s for s in profile.stages}
        self.sales_stages: dict[str, SimStage] = {s.key: s for s in profile.sales_stages or []}
        self.users: list[SimUser] = []
        self.accounts: list[SimAccount] = []
        self._accounts_by_native: tuple[int, dict[str, SimAccount]] | None = None  # account_by_native's index
        self.opps: dict[str, SimOpportunity] = {}
        self._seq = 0
        # Called with ("created" | "updated" | "deleted", opportunity) after each change made through the API or by
        # simulated activity: the simulators' webhook senders (sandbox/kit/webhooks.py) listen here. Not called
        # for changes that do not move the change cursor (bump=False), which CRMs do not notify either.
        self.listeners: list[Callable[[str, SimOpportunity], None]] = []
        self._generate(opportunities)

    def _emit(self, kind: str, opp: SimOpportunity) -> None:
        for listener in list(self.listeners):
            listener(kind, opp)

    # -- generation --------------------------------------------------------------------------------------------

    def _generate(self, n: int) -> None:
        rng, p = self.rng, self.profile
        for i in range(p.users):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            self.users.append(
                SimUser(
                    i,
                    p.user_id(i),
                    f"{first} {last}",
                    f"{first}.{last}{i}@example.com".lower().replace("'", ""),
                    active=rng.random() > 0.05,
                )
            )
        for j in range(p.team_owners):
            i = len(self.users)
            self.users.append(
                SimUser(i, p.user_id(i), f"Team {rng.choice(COMPANY)} {j}", f"team{j}@example.com", kind="team")
            )
        n_accounts = max(5, int(n * p.accounts_per_opportunity))
        for i in range(n_accounts):
            city = rng.choice(CITIES)
            missing = rng.random() < 0.1  # some accounts have no address at all
            self.accounts.append(
                SimAccount(
                    i,
                    p.account_id(i),
                    f"{rng.choice(COMPANY)} {rng.choice(SUFFIX)} {i}",
                    None
                    if missing
                    else f"{rng.randint(1, 999)} {rng.choice(['Main St', 'Hauptstraße', 'Rue de l’Église'])}",
                    None if missing else city[0],
                    None if missing else city[1],
                    None if missing else city[2],
                    None if missing else city[3],
                    site_id=str(1000 + i),
                    site_name="Main" if rng.random() < 0.8 else f"Branch {i % 7}",
                )
            )
        now = truncate(self.clock.start, timedelta(seconds=1))  # not now(): real milliseconds would leak in
        two_years = 730 * 24 * 3600
        for _ in range(n):
            created = now - timedelta(seconds=rng.randint(3600, two_years))
            modified = created + timedelta(seconds=rng.randint(0, int((now - created).total_seconds())))
            self._insert(self._random_opportunity(created, truncate(modified, p.precision)))

    def _random_opportunity(self, created: datetime, modified: datetime, stage: str | None = None) -> SimOpportunity:
        rng, p = self.rng, self.profile
        created = truncate(created, p.precision)
        owner = rng.randrange(len(self.users))
        creator = owner if rng.random() < 0.6 else rng.randrange(p.users)  # creators are users, never teams
        st = self.stages[stage] if stage else rng.choice(list(self.stages.values()))
        account = None if rng.random() < 0.03 else rng.randrange(len(self.accounts))
        name = (
            f"{self.accounts[account].name.split(' ')[0] if account is not None else 'Prospect'} - {rng.choice(DEAL)}"
        )
        return SimOpportunity(
            native_id="",
            seq=0,
            name=name,
            account=account,
            owner=owner,
            creator=creator,
            stage=st.key,
            amount=None if rng.random() < 0.05 else round(rng.uniform(500, 250_000), 2),
            currency=rng.choice(p.currencies),
            probability=st.probability,
            close_date=(created + timedelta(days=rng.randint(7, 180))).date(),
            created_at=created,
            modified_at=max(modified, created),
        )

    def _insert(self, opp: SimOpportunity) -> SimOpportunity:
        self._seq += 1
        opp.seq = self._seq
        opp.native_id = opp.native_id or self.profile.opportunity_id(self._seq)
        if opp.sales_stage is None:
            self._assign_sales_stage(opp)
        if opp.closed_at is None and self.status(opp) != "open":
            # generated history: closed somewhere between creation and the last edit (often long before it);
            # derived from the record, never from the shared rng, so every other generated value stays as it was
            span = (opp.modified_at - opp.created_at).total_seconds()
            share = (opp.seq * 2654435761 % 1000) / 1000
            opp.closed_at = truncate(opp.created_at + timedelta(seconds=span * share), self.profile.precision)
        self.opps[opp.native_id] = opp
        return opp

    def _assign_sales_stage(self, opp: SimOpportunity) -> None:
        """A sales stage that fits the status: won deals stand in the won stage, lost ones where they were lost,
        open ones in an open stage. Derived from the record (never from the shared rng, so adding sales
        stages to a profile leaves every other generated value as it was)."""
        if not self.sales_stages:
            return
        ordered = sorted(self.sales_stages.values(), key=lambda s: s.order)
        status = self.status(opp)
        pick = opp.seq * 7919 + sum(map(ord, opp.stage))
        if status == "won":
            won = [s for s in ordered if s.is_won] or ordered[-1:]
            opp.sales_stage = won[0].key
        else:
            open_ = [s for s in ordered if not s.is_closed] or ordered
            if status == "lost":
                lost = [s for s in ordered if s.is_closed and not s.is_won]
                open_ = lost + open_ if lost and pick % 2 else open_
            opp.sales_stage = open_[pick % len(open_)].key

    # -- reading -----------------------------------------------------------------------------------------------

    def sales_stage_of(self, opp: SimOpportunity) -> SimStage:
        """The stage users see: the separate sales stage where the CRM has one, else the stage itself."""
        if self.sales_stages and opp.sales_stage is not None:
            return self.sales_stages[opp.sales_stage]
        return self.stages[opp.stage]

    def status(self, opp: SimOpportunity) -> str:
        st = self.stages[opp.stage]
        return "open" if not st.is_closed else ("won" if st.is_won else "lost")

    def live(self) -> Iterator[SimOpportunity]:
        return (o for o in self.opps.values() if o.deleted_at is None)

    def get(self, native_id: str, include_deleted: bool = False) -> SimOpportunity | None:
        o = self.opps.get(native_id)
        if o is None or (o.deleted_at is not None and not include_deleted):
            return None
        return o

    def account_modified(self, acc: SimAccount) -> datetime:
        """The account's own change time: its last rename, else a fixed moment well before the tenant's data
        (derived from the account, not drawn from the rng, so generated tenants stay as they were)."""
        if acc.modified_at is not None:
            return acc.modified_at
        return truncate(self.clock.start - timedelta(days=800 + acc.idx % 300, seconds=acc.idx), self.profile.precision)

    def user_by_native(self, native_id: str) -> SimUser | None:
        return next((u for u in self.users if u.native_id == native_id or u.alt_id == native_id), None)

    def account_by_native(self, native_id: str) -> SimAccount | None:
        """The account with this id, from an index (ConnectWise reads a company's site per company: at 1,000,000
        opportunities a scan of 300,000 accounts a request made the simulator the 1,000,000 sync's bottleneck),
        rebuilt when accounts were added; the first of equal ids wins, as a scan would find it."""
        index = self._accounts_by_native
        if index is None or index[0] != len(self.accounts):
            by_id: dict[str, SimAccount] = {}
            for a in self.accounts:
                by_id.setdefault(a.native_id, a)
            index = self._accounts_by_native = (len(self.accounts), by_id)
        return index[1].get(native_id)

    def stage_for(self, pipeline: str | None, want: str) -> SimStage:
        """The first stage of `pipeline` that is open / won / lost."""
        for s in sorted(self.stages.values(), key=lambda s: s.order):
            if pipeline and s.pipeline != pipeline:
                continue
            cat = "open" if not s.is_closed else ("won" if s.is_won else "lost")
            if cat == want:
                return s
        raise KeyError(f"no {want} stage in pipeline {pipeline}")

    # -- writing (what the CRM's write endpoints do) -------------------------------------------------------------

    def create(self, *, touch_time: datetime | None = None, **values: Any) -> SimOpportunity:
        with self.lock:
            now = touch_time or self.clock.now()
            opp = self._random_opportunity(now, now)
            opp.extra = None
            for k, v in values.items():
                self._set(opp, k, v)
            opp.created_at = opp.modified_at = now
            opp.closed_at = now if self.status(opp) != "open" else None
            self.version += 1
            self._insert(opp)
            self._emit("created", opp)
            return opp

    def update(
        self, native_id: str, *, bump: bool = True, touch_time: datetime | None = None, **values: Any
    ) -> SimOpportunity:
        """Change fields; `bump=False` reproduces changes that do not move the change cursor
        (Salesforce formula fields, HubSpot archiving)."""
        with self.lock:
            opp = self.opps[native_id]
            before = self.status(opp)
            for k, v in values.items():
                self._set(opp, k, v)
            if "closed_at" not in values:
                self._status_moved(opp, before, touch_time or self.clock.now())
            if bump:
                opp.modified_at = touch_time or self.clock.now()
            self.version += 1
            if bump:
                self._emit("updated", opp)
            return opp

    def _status_moved(self, opp: SimOpportunity, before: str, at: datetime) -> None:
        """Keep the close time with the status: set when the opportunity enters a closed status (or moves
        between won and lost), cleared on a reopen."""
        after = self.status(opp)
        if after == before:
            return
        opp.closed_at = None if after == "open" else truncate(at, self.profile.precision)

    def delete(self, native_id: str, *, bump: bool = False) -> SimOpportunity:
        with self.lock:
            opp = self.opps[native_id]
            now = self.clock.now()
            opp.deleted_at = now
            if bump:
                opp.modified_at = now
            self.version += 1
            self._emit("deleted", opp)
            return opp

    def rename_account(self, idx: int, name: str | None = None, *, at: datetime | None = None) -> SimAccount:
        """Rename an account (what a user does on the account's own page): the account's change time moves,
        its opportunities' does not."""
        with self.lock:
            acc = self.accounts[idx]
            acc.name = (
                name
                if name is not None
                else (acc.name + " (renamed)" if not acc.name.endswith(")") else acc.name[:-10])
            )
            acc.modified_at = at or self.clock.now()
            self.version += 1
            return acc

    def _set(self, opp: SimOpportunity, key: str, value: Any) -> None:
        if key in SimOpportunity.__slots__ and key not in ("native_id", "seq"):
            setattr(opp, key, value)
            if key == "stage":
                opp.probability = self.stages[value].probability
                self._assign_sales_stage(opp)
        else:
            if opp.extra is None:
                opp.extra = {}
            opp.extra[key] = value

    # -- activity over time --------------------------------------------------------------------------------------

    def advance(self, hours: float = 1.0, rate: float = 0.01) -> dict[str, int]:
        """Move the clock forward and apply realistic change: about `rate` of opportunities touched per hour.

        Changes come in bursts that share one timestamp (a mass update), some change values without
        moving the change cursor (formula / roll-up fields, account renames), deletions do not bump it.
        """
        counts = dict(
            created=0,
            stage_moved=0,
            amount_edited=0,
            won=0,
            lost=0,
            reopened=0,
            deleted=0,
            owner_changed=0,
            account_renamed=0,
            silent_changed=0,
        )
        rng = self.rng
        with self.lock:
            whole = int(hours)
            steps = [1.0] * whole + ([hours - whole] if hours > whole else [])
            for step in steps:
                start = self.clock.now()
                self.clock.advance(timedelta(hours=step))
                span = max(1, int(step * 3600))
                n_live = max(1, len(self.opps))
                n_changes = max(1, int(n_live * rate * step))
                burst_at = truncate(start + timedelta(seconds=rng.randrange(span)), self.profile.precision)
                ids = list(self.opps) if len(self.opps) < 50_000 else None
                for i in range(n_changes):
                    # a third of the changes land in one burst sharing a single timestamp
                    at = (
                        burst_at
                        if i % 3 == 0
                        else truncate(start + timedelta(seconds=rng.randrange(span)), self.profile.precision)
                    )
                    kind = rng.choices(
                        [
                            "created",
                            "stage_moved",
                            "amount_edited",
                            "won",
                            "lost",
                            "reopened",
                            "deleted",
                            "owner_changed",
                            "account_renamed",
                            "silent_changed",
                        ],
                        weights=[20, 25, 15, 8, 7, 3, 3, 8, 2, 2],
                    )[0]
                    if kind == "created":
                        opp = self._random_opportunity(at, at, stage=self.stage_for(None, "open").key)
                        self._insert(opp)
                        self._emit("created", opp)
                        counts[kind] += 1
                        continue
                    native_id = rng.choice(ids) if ids is not None else self._random_id()
                    opp = self.opps[native_id]
                    if opp.deleted_at is not None:
                        continue
                    status = self.status(opp)
                    pipeline = self.stages[opp.stage].pipeline
                    before = status
                    if kind == "stage_moved" and status == "open":
                        opens = [s for s in self.stages.values() if not s.is_closed and s.pipeline == pipeline]
                        self._set(opp, "stage", rng.choice(opens).key)
                    elif kind in ("won", "lost") and status == "open":
                        self._set(opp, "stage", self.stage_for(pipeline, kind).key)
                        opp.close_date = at.date()
                    elif kind == "reopened" and status != "open":
                        self._set(opp, "stage", self.stage_for(pipeline, "open").key)
                    elif kind == "amount_edited":
                        opp.amount = round(rng.uniform(500, 250_000), 2)
                    elif kind == "owner_changed":
                        opp.owner = rng.randrange(len(self.users))
                    elif kind == "deleted":
                        opp.deleted_at = at
                        self._emit("deleted", opp)
                        counts[kind] += 1
                        continue
                    elif kind == "account_renamed" and opp.account is not None:
                        self.rename_account(opp.account, at=at)
                        counts[kind] += 1
                        continue
                    elif kind == "silent_changed":
                        # a formula-like value that changes without bumping the change cursor
                        opp.probability = round(rng.uniform(0, 100), 1)
                        counts[kind] += 1
                        continue
                    else:
                        continue
                    self._status_moved(opp, before, at)
                    opp.modified_at = at
                    self._emit("updated", opp)
                    counts[kind] += 1
            self.version += 1
        return counts

    def _random_id(self) -> str:
        return self.profile.opportunity_id(self.rng.randint(1, self._seq))
