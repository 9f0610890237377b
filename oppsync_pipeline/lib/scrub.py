"""Secrets kept out of everything oppsync stores or logs: error and warning texts in the warehouse, exception
messages Dagster records, log records and CLI output.

A CRM error body may echo the request (its headers, its query string, the form it was sent), whole or cut
short at some length, so a Scrubber knows each secret in the forms it takes on the wire:
  - the raw configured value, and the values an Auth puts in request headers at run time (OAuth access
    tokens, the Basic pair), registered by ApiClient as it sends them;
  - URL-encoded (form bodies, query strings) and inside base64 (a Basic `user:pass` pair);
  - any piece of 8 or more characters of each form (a token cut at a length limit still leaks its prefix).
Values shorter than 8 characters are only matched whole, and only from 4 characters on (shorter ones
would blank out ordinary words). Identifiers (client ids, user names, company ids) name the account
rather than prove it: they are matched whole, never by piece, since their pieces are ordinary text
("oppsync", "example.com").

Every live Scrubber takes part in `redact` and in the log filter, so text is scrubbed of every connection's
secrets without being told which connection produced it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

MASK = "***"
PIECE = 8  # pieces of this length (and longer) of a secret are secret too
SHORTEST = 4  # shorter values are never matched (they would match ordinary text)
IDENTIFIER_KEYS = frozenset({"client_id", "tenant_id", "company_id", "public_key", "username"})
# Headers an Auth may set that never carry a credential (content negotiation).
NOT_CREDENTIALS = frozenset(
    {"accept", "accept-encoding", "content-type", "user-agent", "prefer", "odata-version", "odata-maxversion"}
)
_ESCAPE = re.compile(r"%[0-9A-F]{2}")


class Scrubber:
    """The secrets of one connection, in every form; `scrubber(text)` masks them in `text`."""

    def __init__(self, credentials: Mapping[str, str | None] | None = None) -> None:
        self._pieces: set[str] = set()  # every PIECE-long window of every form of every secret
        self._whole: set[str] = set()  # secret forms matched whole only (too short to have pieces ...)
        self._identifiers: set[str] = set()  # forms of identifiers: matched whole
        self._known: set[str] = set()  # the values registered, as given
        self._lock = threading.Lock()
        if credentials:
            self.add_credentials(credentials)
        _track(self)

    # -- what it knows -------------------------------------------------------------------------------------------

    def add_credentials(self, credentials: Mapping[str, str | None]) -> None:
        for key, value in credentials.items():
            if key in IDENTIFIER_KEYS:
                self.add_identifier(value)
            else:
                self.add_secret(value)

    def add_secret(self, value: str | None) -> None:
        if value:
            self._known.add(value)
            for form in secret_forms(value):
                self._add(form)

    def add_identifier(self, value: str | None) -> None:
        if value:
            self._known.add(value)
            with self._lock:
                self._identifiers.update(f for f in url_forms(value) if len(f) >= SHORTEST)

    def add_sent_headers(self, before: Mapping[str, str], after: Mapping[str, str]) -> None:
        """What an Auth added to a request's headers (compare the headers before and after `apply`)."""
        for name, value in after.items():
            if (
                before.get(name) == value
                or not isinstance(value, str)
                or name.lower() in NOT_CREDENTIALS
                or self.knows(value)
            ):  # every request sends the same token: learned once
                continue
            if name.lower() == "authorization":
                self.add_authorization(value)
                self._known.add(value)
            else:
                self.add_secret(value)

    def add_authorization(self, value: str) -> None:
        """`Bearer <token>` -> the token; `Basic <b64>` -> the base64 text and the decoded pair's password, its
        user name matched whole; any other scheme -> its parameter. (The header's other characters, `Bearer `
        and the pair's user name, are not secret: masking every piece of the rest masks the whole value.)"""
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip() or scheme
        org, bang, session = credential.partition("!")
        if bang and org and session:
            # A Salesforce token is `<org id>!<session>`. The org id is no secret, and its pieces are those of
            # every record id of the org (00D5g000..., 0065g000...): the token is masked whole, the session
            # by piece.
            with self._lock:
                self._whole.update(url_forms(credential))
            credential = session
        self.add_secret(credential)
        if scheme.lower() == "basic":
            pair = _b64decode(credential)
            if pair is not None:
                user, _, password = pair.partition(":")
                self.add_identifier(user)
                self.add_secret(password)

    def knows(self, value: str) -> bool:
        return value in self._known

    def _add(self, form: str) -> None:
        with self._lock:
            if len(form) >= PIECE:
                self._pieces.update(form[i : i + PIECE] for i in range(len(form) - PIECE + 1))
            elif len(form) >= SHORTEST:
                self._whole.add(form)

    # -- masking ---------------------------------------------------------------------------------------------------

    def spans(self, text: str, *, identifiers: bool = True) -> list[tuple[int, int]]:
        """Where `text` shows a secret (and, unless told not to, an identifier): (start, end), unmerged."""
        with self._lock:
            pieces, whole = self._pieces, (*self._whole, *(self._identifiers if identifiers else ()))
            found = (
                [(i, i + PIECE) for i in range(len(text) - PIECE + 1) if text[i : i + PIECE] in pieces]
                if pieces
                else []
            )
        for value in whole:
            start = text.find(value)
            while start >= 0:
                found.append((start, start + len(value)))
                start = text.find(value, start + 1)
        return found

    def __call__(self, text: str) -> str:
        return mask(text, self.spans(text)) if text else text


def secret_forms(value: str) -> set[str]:
    """A secret as it may appear in text: itself, URL-encoded, and inside any base64 text that encodes it."""
    return url_forms(value) | set(base64_pieces(value))


def url_forms(value: str) -> set[str]:
    forms = {value, quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")}
    return forms | {_lower_hex(f) for f in forms}


def base64_pieces(value: str) -> Iterable[str]:
    """The base64 characters that encode `value` wherever it sits in the encoded bytes: base64 works in groups
    of 3 bytes, so `value` lands at one of 3 offsets; at each, the characters that depend on its bytes alone
    appear in any encoding of a text containing it (a Basic `user:password` pair ...)."""
    raw = value.encode("utf-8")
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode("ascii")
        first = -(-offset * 8 // 6)  # the first character made of `value`'s bits only
        last = (offset + len(raw)) * 8 // 6  # the characters after it also hold the next bytes
        piece = encoded[first:last]
        if len(piece) >= PIECE:
            yield piece
            yield piece.replace("+", "-").replace("/", "_")  # the URL-safe alphabet


def _lower_hex(text: str) -> str:
    """`%2F` -> `%2f`: some encoders write lower-case escapes."""
    return _ESCAPE.sub(lambda m: m.group(0).lower(), text)


def _b64decode(text: str) -> str | None:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """`text` with each run of overlapping or touching spans replaced by one MASK."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return text
    out, at = [], 0
    for start, end in merged:
        out += [text[at:start], MASK]
        at = end
    out.append(text[at:])
    return "".join(out)


# -- every live scrubber ----------------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[Scrubber] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _track(scrubber: Scrubber) -> None:
    with _LIVE_LOCK:
        _LIVE.add(scrubber)


def redact(text: str) -> str:
    """`text` without the secrets of any connection alive in this process. Identifiers are left: text that
    no connection produced (a log line, a warehouse error) is not masked for naming an account."""
    if not text:
        return text
    with _LIVE_LOCK:
        live = list(_LIVE)
    return mask(text, [span for scrubber in live for span in scrubber.spans(text, identifiers=False)])


class ScrubFilter(logging.Filter):
    """Masks secrets in a log record before any handler formats it (message, exception text, stack)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: the handler reports it, unchanged
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = ScrubFilter()


def scrubbed_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)` whose records are scrubbed where they are made, so that every handler
    (the CLI's, Dagster's, pytest's, Python's last resort) gets them clean."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def scrub_handlers(handlers: Iterable[logging.Handler]) -> None:
    """Add the filter to handlers oppsync installs (they also get other libraries' records)."""
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
