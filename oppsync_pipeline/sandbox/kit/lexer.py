"""What the three query languages' parsers share (SOQL, OData $filter, ConnectWise conditions): a tokenizer
driven by one regex of named groups, and a cursor over its tokens. The grammars, literals and error messages
are each API's own and stay in its module."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def lex(
    pattern: re.Pattern[str], text: str, error: Callable[[int], Exception], skip: frozenset[str] = frozenset({"ws"})
) -> list[tuple[str, str, int]]:
    """(group name, matched text, position) for each token of `text`; `error(pos)` is raised where no group
    matches. Groups named in `skip` (whitespace) are dropped."""
    out, pos = [], 0
    while pos < len(text):
        m = pattern.match(text, pos)
        if not m or m.end() == pos:
            raise error(pos)
        kind = m.lastgroup or ""
        if kind not in skip:
            out.append((kind, m.group(kind), pos))
        pos = m.end()
    return out


class TokenCursor:
    """A recursive-descent parser's position in its token list."""

    def __init__(self, toks: list[Any]):
        self.toks, self.i = toks, 0

    def peek(self) -> Any:
        """The next token, or None at the end."""
        return self.toks[self.i] if self.i < len(self.toks) else None
