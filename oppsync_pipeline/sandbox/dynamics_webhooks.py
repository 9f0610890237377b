"""The Dataverse simulator's webhooks: the plug-in registration tables and the requests a webhook step sends
(lib/webhooks/dynamics.py has the vendor sources; crm-write-webhook-notes.md §3.2).

Served (with the simulator's bearer token and service protection):
  GET    /api/data/v9.2/{serviceendpoints|sdkmessages|sdkmessagefilters|sdkmessageprocessingsteps}  $select $filter
  POST   /serviceendpoints            contract 8 (Webhook) only; authtype 4 WebhookKey | 5 HttpHeader | 6
                                      HttpQueryString; `authvalue` is write-only (never read back)
  PATCH|DELETE /serviceendpoints(<id>)
  POST   /sdkmessageprocessingsteps   binds eventhandler_serviceendpoint, sdkmessageid, sdkmessagefilterid (the filter
                                      must belong to the message); asynchronous steps only at stage 40;
                                      filteringattributes only on Update
  PATCH|DELETE /sdkmessageprocessingsteps(<id>)
Creating or changing an endpoint points the sender (kit/webhooks.py) at its URL; the control endpoint
`POST /__sandbox/webhooks {"url"}` points it elsewhere, and a URL no registered endpoint has gets what a default
registration would send: WebhookKey `SANDBOX_WEBHOOK_SECRETS["webhook_key"]`, Create / Update / Delete unfiltered.
One request per step execution (Dataverse does not batch): the body a `RemoteExecutionContext` (shape of the
use-webhooks.md sample: Target with only the changed columns on Update, an EntityReference on Delete [U]), the
x-ms-dynamics-* headers, the key as `?code=` or as the endpoint's headers / query parameters. An Update step with
filteringattributes fires only when one of them changed; the simulator diffs each opportunity against the values it
last saw. OperationId (the system job) is new per step and change; a delivery duplicated by the faults repeats it.
Simplification: one subscriber URL at a time (the sender's), where Dataverse would post to every endpoint.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode
from xml.etree import ElementTree

from oppsync_pipeline.sandbox.kit.webhooks import Change, Outgoing
from oppsync_pipeline.sandbox.server import HttpError, Request, Response
from oppsync_pipeline.sandbox.world import SimOpportunity

if TYPE_CHECKING:
    from oppsync_pipeline.sandbox.dynamics import DynamicsSimulator

API = "/api/data/v9.2"
ORGANIZATION_ID = "4ef5b371-e89e-e711-8122-000d3a5a1b2c"
ORGANIZATION_NAME = "orgsandbox"
ORGANIZATION_HOST = "orgsandbox.crm.dynamics.com"
CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"
_NS = uuid.UUID("5b0f4d1e-0c55-4d2e-9a51-6d7a1c2b3e4f")
# The platform's SDK messages (ids are per environment in reality) and the tables they have filters for.
SDK_MESSAGES = {
    name: str(uuid.uuid5(_NS, f"sdkmessage:{name}"))
    for name in ("Create", "Update", "Delete", "Assign", "SetState", "Retrieve", "Win", "Lose")
}
FILTER_TABLES = ("opportunity", "account", "contact", "quote")
KIND_MESSAGE = {"created": "Create", "updated": "Update", "deleted": "Delete"}
# The opportunity's columns a step can be told about, and how a RemoteExecutionContext carries each.
LOOKUP_TARGETS = {
    "_parentaccountid_value": "account",
    "_customerid_value": "account",
    "_ownerid_value": "systemuser",
    "_transactioncurrencyid_value": "transactioncurrency",
    "_new_signedby_value": "systemuser",
}
MONEY = frozenset({"estimatedvalue"})
OPTION_SETS = frozenset({"statecode", "statuscode", "salesstage", "cr123_dealphase"})
TRACKED = (
    "name",
    "estimatedvalue",
    "estimatedclosedate",
    "closeprobability",
    "statecode",
    "statuscode",
    "salesstage",
    "stepname",
    "stageid",
    "actualclosedate",
    "description",
    *LOOKUP_TARGETS,
)
ENDPOINT_FIELDS = frozenset({"name", "url", "contract", "authtype", "authvalue", "description", "messageformat"})
STEP_FIELDS = frozenset(
    {
        "name",
        "description",
        "mode",
        "stage",
        "rank",
        "supporteddeployment",
        "asyncautodelete",
        "filteringattributes",
        "statecode",
        "eventhandler_serviceendpoint@odata.bind",
        "sdkmessageid@odata.bind",
        "sdkmessagefilterid@odata.bind",
    }
)


def _bad(message: str) -> HttpError:
    return HttpError(400, "0x80040203", message)


def _filter_id(message: str, table: str) -> str:
    return str(uuid.uuid5(_NS, f"sdkmessagefilter:{message}:{table}"))


def ms_date(value: datetime | date) -> str:
    """`/Date(ms)/` as DataContractJsonSerializer writes a UTC DateTime."""
    if not isinstance(value, datetime):
        value = datetime.combine(value, datetime.min.time())
    return f"/Date({int(value.replace(tzinfo=UTC).timestamp() * 1000)})/"


def settings_of(authvalue: str) -> list[tuple[str, str]]:
    """HttpHeader / HttpQueryString `authvalue`: `<settings><setting name="..." value="..."/></settings>`."""
    try:
        root = ElementTree.fromstring(authvalue)
    except ElementTree.ParseError:
        raise _bad("authvalue must be <settings><setting name=... value=.../></settings> for this authtype") from None
    if root.tag != "settings":
        raise _bad("authvalue must be <settings><setting name=... value=.../></settings> for this authtype")
    pairs = [(s.get("name") or "", s.get("value") or "") for s in root.findall("setting")]
    if not pairs or any(not n for n, _ in pairs):
        raise _bad("authvalue has no <setting name=... value=...> entries")
    return pairs


class WebhookRegistrations:
    """serviceendpoints and sdkmessageprocessingsteps of one Dataverse environment, and what its steps send."""

    def __init__(self, sim: DynamicsSimulator, default_key: str):
        self.sim = sim
        self.default_key = default_key
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.steps: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        from oppsync_pipeline.sandbox.dynamics import CUSTOM_COLUMNS, CUSTOM_TENANT_COLUMNS

        cols = sim.sets["opportunities"].columns
        self._tracked = [c for c in (*TRACKED, *CUSTOM_COLUMNS, *CUSTOM_TENANT_COLUMNS) if c in cols]
        # The values each opportunity had when last seen, taken once something subscribes (a 100k tenant costs
        # ~0.7 s): until then a change is not observed at all; the first change after a URL set by the control
        # endpoint carries all columns.
        self._seen: dict[str, dict[str, Any]] | None = None
        self._changed: dict[str, deque[dict[str, Any] | None]] = defaultdict(deque)

    # -- tables ----------------------------------------------------------------------------------------------

    def entity_sets(self) -> dict[str, Any]:
        from oppsync_pipeline.sandbox.dynamics import EntitySet

        def col(name: str) -> Callable[[Any], Any]:
            return lambda r: r.get(name)

        endpoint_cols = ("serviceendpointid", "name", "url", "contract", "authtype", "messageformat", "description")
        step_cols = (
            "sdkmessageprocessingstepid",
            "name",
            "description",
            "mode",
            "stage",
            "rank",
            "supporteddeployment",
            "asyncautodelete",
            "filteringattributes",
            "statecode",
            "statuscode",
            "_eventhandler_value",
            "_sdkmessageid_value",
            "_sdkmessagefilterid_value",
        )
        messages = [{"sdkmessageid": i, "name": n} for n, i in SDK_MESSAGES.items()]
        filters = [
            {
                "sdkmessagefilterid": _filter_id(n, t),
                "_sdkmessageid_value": i,
                "primaryobjecttypecode": t,
                "secondaryobjecttypecode": "none",
                "iscustomprocessingstepallowed": True,
            }
            for n, i in SDK_MESSAGES.items()
            for t in FILTER_TABLES
        ]
        return {
            "serviceendpoints": EntitySet(
                "serviceendpoints",
                "serviceendpoint",
                "serviceendpointid",
                lambda: iter(list(self.endpoints.values())),
                {c: col(c) for c in endpoint_cols},
            ),
            "sdkmessages": EntitySet(
                "sdkmessages", "sdkmessage", "sdkmessageid", lambda: iter(messages), {c: col(c) for c in messages[0]}
            ),
            "sdkmessagefilters": EntitySet(
                "sdkmessagefilters",
                "sdkmessagefilter",
                "sdkmessagefilterid",
                lambda: iter(filters),
                {c: col(c) for c in filters[0]},
                {"_sdkmessageid_value": ("sdkmessageid", "sdkmessages")},
            ),
            "sdkmessageprocessingsteps": EntitySet(
                "sdkmessageprocessingsteps",
                "sdkmessageprocessingstep",
                "sdkmessageprocessingstepid",
                lambda: iter(list(self.steps.values())),
                {c: col(c) for c in step_cols},
                {
                    "_eventhandler_value": ("eventhandler_serviceendpoint", "serviceendpoints"),
                    "_sdkmessageid_value": ("sdkmessageid", "sdkmessages"),
                    "_sdkmessagefilterid_value": ("sdkmessagefilterid", "sdkmessagefilters"),
                },
            ),
        }

    def routes(self, api: Callable[..., None], guid: str) -> None:
        sets = "serviceendpoints|sdkmessages|sdkmessagefilters|sdkmessageprocessingsteps"
        api("GET", rf"{API}/(?P<set>{sets})", self.sim.collection)
        api("GET", rf"{API}/(?P<set>{sets})\((?P<id>{guid})\)", self.sim.single)
        api("POST", rf"{API}/(?P<set>serviceendpoints|sdkmessageprocessingsteps)", self.create)
        api("PATCH", rf"{API}/(?P<set>serviceendpoints|sdkmessageprocessingsteps)\((?P<id>{guid})\)", self.update)
        api("DELETE", rf"{API}/(?P<set>serviceendpoints|sdkmessageprocessingsteps)\((?P<id>{guid})\)", self.delete)

    def create(self, req: Request) -> Response:
        kind = req.params["set"]
        body = req.json()
        with self._lock:
            if kind == "serviceendpoints":
                rec = self._endpoint({"serviceendpointid": str(uuid.uuid4()), "messageformat": 2}, body, True)
                self.endpoints[rec["serviceendpointid"]] = rec
                self._watch()
                self.sim.webhooks.url = rec["url"]
            else:
                rec = self._step({"sdkmessageprocessingstepid": str(uuid.uuid4()), "statecode": 0}, body, True)
                self.steps[rec["sdkmessageprocessingstepid"]] = rec
        return self.sim._record_written(req, kind, rec, 201)

    def update(self, req: Request) -> Response:
        kind, ident = req.params["set"], req.params["id"].lower()
        table = self.endpoints if kind == "serviceendpoints" else self.steps
        with self._lock:
            if ident not in table:
                raise HttpError(404, "0x80040217", f"{kind[:-1]} With Id = {ident} Does Not Exist")
            if kind == "serviceendpoints":
                rec = self._endpoint(dict(table[ident]), req.json(), False)
                self._watch()
                self.sim.webhooks.url = rec["url"]
            else:
                rec = self._step(dict(table[ident]), req.json(), False)
            table[ident] = rec
        return Response.empty(204, {"OData-EntityId": f"{self.sim._base(req)}{API}/{kind}({ident})"})

    def delete(self, req: Request) -> Response:
        kind, ident = req.params["set"], req.params["id"].lower()
        with self._lock:
            if kind == "serviceendpoints":
                if any(s["_eventhandler_value"] == ident for s in self.steps.values()):
                    raise _bad("The service endpoint has registered steps; delete them first.")
                gone = self.endpoints.pop(ident, None)
            else:
                gone = self.steps.pop(ident, None)
        if gone is None:
            raise HttpError(404, "0x80040217", f"{kind[:-1]} With Id = {ident} Does Not Exist")
        return Response.empty(204)

    def _endpoint(self, rec: dict[str, Any], body: Any, creating: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _bad("The request body must be a serviceendpoint object.")
        unknown = sorted(set(body) - ENDPOINT_FIELDS)
        if unknown:
            raise _bad(f"Invalid property '{unknown[0]}' was found in entity 'Microsoft.Dynamics.CRM.serviceendpoint'.")
        rec.update(body)
        if not rec.get("name") or not str(rec.get("url", "")).startswith(("http://", "https://")):
            raise _bad("A webhook service endpoint needs a name and an absolute http(s) url.")
        if rec.get("contract") != 8:
            raise _bad("This environment accepts only webhook service endpoints (contract 8) in the sandbox.")
        if rec.get("authtype") not in (4, 5, 6):
            raise _bad("A webhook's authtype is 4 (WebhookKey), 5 (HttpHeader) or 6 (HttpQueryString).")
        if not rec.get("authvalue"):
            raise _bad("authvalue is required for a webhook.")
        if rec["authtype"] in (5, 6):
            settings_of(rec["authvalue"])
        return rec

    def _step(self, rec: dict[str, Any], body: Any, creating: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _bad("The request body must be an sdkmessageprocessingstep object.")
        unknown = sorted(set(body) - STEP_FIELDS)
        if unknown:
            raise _bad(
                f"Invalid property '{unknown[0]}' was found in entity 'Microsoft.Dynamics.CRM.sdkmessageprocessingstep'."
            )
        for field, column, table in (
            ("eventhandler_serviceendpoint@odata.bind", "_eventhandler_value", "serviceendpoints"),
            ("sdkmessageid@odata.bind", "_sdkmessageid_value", "sdkmessages"),
            ("sdkmessagefilterid@odata.bind", "_sdkmessagefilterid_value", "sdkmessagefilters"),
        ):
            if field in body:
                bind = str(body.pop(field))
                prefix = f"/{table}("
                ident = bind[len(prefix) : -1].lower() if bind.startswith(prefix) and bind.endswith(")") else ""
                rows = {r[self.sim.sets[table].key] for r in self.sim.sets[table].rows()}
                if ident not in rows:
                    raise HttpError(404, "0x80040217", f"{table[:-1]} With Id = {ident or bind} Does Not Exist")
                rec[column] = ident
        rec.update(body)
        rec.setdefault("rank", 1)
        rec.setdefault("supporteddeployment", 0)
        rec.setdefault("asyncautodelete", False)
        rec.setdefault("filteringattributes", None)
        rec["statuscode"] = 1 if rec.get("statecode", 0) == 0 else 2
        missing = [
            c for c in ("name", "_eventhandler_value", "_sdkmessageid_value", "mode", "stage") if rec.get(c) is None
        ]
        if missing:
            raise _bad(f"Required field(s) missing for the step: {', '.join(missing)}.")
        if rec["mode"] not in (0, 1) or rec["stage"] not in (10, 20, 40):
            raise _bad("mode is 0 (synchronous) or 1 (asynchronous); stage 10, 20 or 40.")
        if rec["mode"] == 1 and rec["stage"] != 40:
            raise _bad("Asynchronous steps can only be registered in the PostOperation stage (40).")
        message = next(n for n, i in SDK_MESSAGES.items() if i == rec["_sdkmessageid_value"])
        flt = rec.get("_sdkmessagefilterid_value")
        if flt and flt not in {_filter_id(message, t) for t in FILTER_TABLES}:
            raise _bad(f"The message filter does not belong to the {message} message.")
        if rec.get("filteringattributes") and message != "Update":
            raise _bad("Filtering attributes apply only to the Update message.")
        return rec

    # -- what a step sends -----------------------------------------------------------------------------------

    def _values(self, opp: SimOpportunity) -> dict[str, Any]:
        cols = self.sim.sets["opportunities"].columns
        return {c: cols[c](opp) for c in self._tracked}

    def _watch(self) -> None:
        with self.sim.world.lock:
            if self._seen is None:
                self._seen = {o.native_id: self._values(o) for o in self.sim.world.live()}

    def observe(self, kind: str, opp: SimOpportunity) -> None:
        """World listener (runs inside the world's lock, before the sender queues the change): which columns it
        changed, for the Update Target and filteringattributes (None: not known, all of them)."""
        if self.sim.webhooks is None or self.sim.webhooks.url is None:
            self._seen = None  # unsubscribed: stop tracking
            return
        if self._seen is None:
            self._watch()
            self._changed[opp.native_id].append(None)
            return
        now = None if kind == "deleted" else self._values(opp)
        before = self._seen.pop(opp.native_id, None)
        if now is not None:
            self._seen[opp.native_id] = now
        changed = {} if now is None else {c: v for c, v in now.items() if before is None or before.get(c) != v}
        self._changed[opp.native_id].append(changed)

    def build(self, changes: list[Change]) -> list[Outgoing]:
        url = self.sim.webhooks.url if self.sim.webhooks is not None else None
        with self._lock:
            endpoint = next(
                (e for e in reversed(list(self.endpoints.values())) if url and e["url"].rstrip("/") == url.rstrip("/")),
                None,
            )
            if endpoint is not None:
                steps = [
                    s
                    for s in self.steps.values()
                    if s["_eventhandler_value"] == endpoint["serviceendpointid"] and s.get("statecode", 0) == 0
                ]
            else:  # a URL set through the control endpoint: the default registration
                endpoint = {"serviceendpointid": None, "authtype": 4, "authvalue": self.default_key}
                steps = [
                    {
                        "sdkmessageprocessingstepid": str(uuid.uuid5(_NS, f"default-step:{m}")),
                        "name": f"oppsync sandbox: {m} of opportunity",
                        "_sdkmessageid_value": SDK_MESSAGES[m],
                        "_sdkmessagefilterid_value": _filter_id(m, "opportunity"),
                        "filteringattributes": None,
                        "mode": 1,
                        "stage": 40,
                    }
                    for m in ("Create", "Update", "Delete")
                ]
        out: list[Outgoing] = []
        for change in changes:
            queued = self._changed.get(change.opp.native_id)
            changed = queued.popleft() if queued else None
            if queued is not None and not queued:
                self._changed.pop(change.opp.native_id, None)
            message = KIND_MESSAGE[change.kind]
            correlation = str(uuid.uuid5(_NS, f"correlation:{self.sim.world.seed}:{change.seq}:{url}"))
            for step in steps:
                if step["_sdkmessageid_value"] != SDK_MESSAGES[message]:
                    continue
                if step.get("_sdkmessagefilterid_value") not in (None, _filter_id(message, "opportunity")):
                    continue
                wanted = [a.strip() for a in (step.get("filteringattributes") or "").split(",") if a.strip()]
                if message == "Update" and wanted and changed is not None:
                    names = {_attribute(c) for c in changed}
                    if not names & set(wanted):
                        continue
                context = self._context(change, message, step, changed, correlation)
                out.append(self._request(endpoint, message, context, correlation, url or ""))
        return out

    def _typed(self, column: str, value: Any) -> Any:
        """A column's value as the RemoteExecutionContext carries it (DataContractJsonSerializer forms)."""
        if value is None:
            return None
        if column in LOOKUP_TARGETS:
            logical = LOOKUP_TARGETS[column]
            if column == "_ownerid_value" and getattr(self.sim.users_by_id.get(value), "kind", "user") == "team":
                logical = "team"
            return _reference(value, logical)
        if column in MONEY:
            return {"__type": f"Money:{CONTRACTS}", "Value": value}
        if column in OPTION_SETS:
            return {"__type": f"OptionSetValue:{CONTRACTS}", "Value": value}
        if isinstance(value, (datetime, date)):
            return ms_date(value)
        return value

    def _context(
        self, change: Change, message: str, step: dict[str, Any], changed: dict[str, Any] | None, correlation: str
    ) -> dict[str, Any]:
        sim, opp = self.sim, change.opp
        user = sim.world.users[opp.owner].native_id
        when = sim.world.clock.now() if change.kind == "deleted" else opp.modified_at
        if message == "Delete":
            target: dict[str, Any] = _reference(opp.native_id, "opportunity")
        else:
            values = self._values(opp) if message == "Create" or changed is None else changed
            attributes = [{"key": "opportunityid", "value": opp.native_id}]
            attributes += [{"key": _attribute(c), "value": self._typed(c, v)} for c, v in values.items()]
            attributes.append({"key": "modifiedon", "value": ms_date(opp.modified_at)})
            target = {
                "__type": f"Entity:{CONTRACTS}",
                "Attributes": attributes,
                "EntityState": None,
                "FormattedValues": [],
                "Id": opp.native_id,
                "KeyAttributes": [],
                "LogicalName": "opportunity",
                "RelatedEntities": [],
                "RowVersion": None,
            }
        return {
            "BusinessUnitId": _business_unit(),
            "CorrelationId": correlation,
            "Depth": 1,
            "InitiatingUserId": user,
            "InputParameters": [{"key": "Target", "value": target}],
            "IsExecutingOffline": False,
            "IsInTransaction": False,
            "IsOfflinePlayback": False,
            "IsolationMode": 1,
            "MessageName": message,
            "Mode": step.get("mode", 1),
            "OperationCreatedOn": ms_date(when),
            "OperationId": str(
                uuid.uuid5(_NS, f"operation:{sim.world.seed}:{step['sdkmessageprocessingstepid']}:{change.seq}")
            ),
            "OrganizationId": ORGANIZATION_ID,
            "OrganizationName": ORGANIZATION_NAME,
            "OutputParameters": [{"key": "id", "value": opp.native_id}] if message == "Create" else [],
            "OwningExtension": {
                **_reference(step["sdkmessageprocessingstepid"], "sdkmessageprocessingstep"),
                "Name": step.get("name"),
            },
            "ParentContext": None,
            "PostEntityImages": [],
            "PreEntityImages": [],
            "PrimaryEntityId": opp.native_id,
            "PrimaryEntityName": "opportunity",
            "RequestId": None,
            "SecondaryEntityName": "none",
            "SharedVariables": [],
            "Stage": step.get("stage", 40),
            "UserId": user,
        }

    def _request(
        self, endpoint: dict[str, Any], message: str, context: dict[str, Any], correlation: str, url: str
    ) -> Outgoing:
        headers = {
            "Content-Type": "application/json",
            "x-ms-dynamics-organization": ORGANIZATION_HOST,
            "x-ms-dynamics-entity-name": "opportunity",
            "x-ms-dynamics-request-name": message,
            "x-ms-correlation-request-id": correlation,
        }
        query: list[tuple[str, str]] = []
        if endpoint["authtype"] == 4:
            query.append(("code", endpoint["authvalue"]))
        elif endpoint["authtype"] == 5:
            headers.update(settings_of(endpoint["authvalue"]))
        else:
            query.extend(settings_of(endpoint["authvalue"]))
        path = ("&" if "?" in url else "?") + urlencode(query, quote_via=quote) if query else ""
        body = json.dumps(context, separators=(",", ":")).replace("/", "\\/").encode("utf-8")
        return Outgoing(body=body, headers=headers, path_and_query=path)


def _attribute(column: str) -> str:
    return column[1:-6] if column.startswith("_") and column.endswith("_value") else column


def _reference(ident: str, logical: str) -> dict[str, Any]:
    return {
        "__type": f"EntityReference:{CONTRACTS}",
        "Id": ident,
        "KeyAttributes": [],
        "LogicalName": logical,
        "Name": None,
        "RowVersion": None,
    }


def _business_unit() -> str:
    from oppsync_pipeline.sandbox.dynamics import BUSINESS_UNIT

    return BUSINESS_UNIT
