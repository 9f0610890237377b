"""The README's write-back tables, generated from the code that does the work (a test keeps them equal):
`python -m oppsync_pipeline.lib.writeback.docs` prints them."""

from __future__ import annotations

from oppsync_pipeline.lib.crm.registry import REGISTRY
from oppsync_pipeline.lib.writeback.contract import COLUMNS


def mapping_table() -> str:
    lines = ["| CRM | field written | from | how |", "|---|---|---|---|"]
    for crm, spec in REGISTRY.items():
        writer = spec.writer_class()
        for t in writer.targets:
            lines.append(f"| {crm} | `{t.field}` | {t.source} | {t.note} |")
    return "\n".join(lines)


def permissions_table() -> str:
    lines = ["| CRM | the API user needs |", "|---|---|"]
    lines += [f"| {crm} | {spec.writer_class().permission} |" for crm, spec in REGISTRY.items()]
    return "\n".join(lines)


def contract_table() -> str:
    lines = ["| column | type | required | meaning |", "|---|---|---|---|"]
    for name, (type_, required, meaning) in COLUMNS.items():
        lines.append(f"| `{name}` | {type_.__name__.lower()} | {'yes' if required else ''} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(contract_table(), mapping_table(), permissions_table(), sep="\n\n")
