"""Machinery the five CRM simulators share: what every API does in its own words but the same way.

- `limits.Window`: one request allowance (a sliding window, or an allocation that never drains);
- `tokens.TokenStore`: issued bearer tokens with their expiry on one clock;
- `snapshots.Snapshots` / `snapshots.QueryCache`: result sets held still while a client pages through them;
- `formats`: the datetime spellings the APIs use;
- `lexer`: the regex tokenizer and token cursor under the three query languages (SOQL, OData $filter,
  ConnectWise conditions).

Each simulator keeps its API's surface: the error bodies, headers and status codes stay in its module.
"""
