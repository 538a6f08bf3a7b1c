"""Human text and --json output, and the mapping of errors to exit codes."""

from __future__ import annotations

import sys
from typing import Any

import orjson

from khala_app.pipeline import ImportReport
from khala_stream.terminal import printable

_DOCUMENT_STATS = ("inserted", "updated", "unchanged", "deleted")


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def counter_line(key: str, value: int) -> str:
    """The reference format: two spaces, `key:` left-justified in 32 columns, the value."""
    return f"  {key + ':':<32} {value}"


def summary_lines(report: ImportReport) -> list[str]:
    """The reference transcript (§7): header lines, the 22 counters, then our own lines."""
    o = report.options
    c = report.counters
    loaded = " ".join(
        f"{t}={c[f'source_{t}']}"
        for t in ("users", "threads", "runs", "messages", "receipts", "blueprints")
    )
    lines = [
        "Khala chat import starting...",
        f"  source: {printable(report.source)}",
        f"  mode: {'dry-run' if report.dry_run else 'write'}",
        f"  replace: {'yes' if o.replace else 'no'}",
        f"  resolve_workos_users: {'yes' if o.resolve_workos_users else 'no'}",
        f"  import_blueprints: {'no' if o.skip_blueprints else 'yes'}",
        f"  Loaded source rows: {loaded}",
    ]
    if o.replace and not report.dry_run:
        lines.append("  Truncated target chat tables (--replace).")
    lines += ["", "Khala chat import summary:"]
    lines += [counter_line(k, v) for k, v in c.items()]
    lines += [
        "",
        f"khala-stream: export sha256 {report.sha256}"
        + (f", run {report.run_id}" if report.run_id else ""),
    ]
    for table, stats in report.documents.items():
        if any(stats.values()):
            counts = " ".join(f"{k}={stats.get(k, 0)}" for k in _DOCUMENT_STATS)
            lines.append(f"  documents {table}: {counts}")
    if report.written:
        written = " ".join(f"{t}={n}" for t, n in sorted(report.written.items()))
        lines.append(f"  rows written: {written}")
    else:
        lines.append("  rows written: none (nothing changed)")
    rejected = sum(report.rejected.values())
    if rejected:
        lines.append(f"  rejected lines: {rejected} (set aside in the dead-letter topic)")
        lines += [f"    {printable(f)}:{n}: {r}" for f, n, r in report.rejected_lines]
    missing = sum(report.missing_key.values())
    if missing:
        lines.append(f"  documents without a key: {missing} (set aside in the dead-letter topic)")
    for table, reason in report.deletes_withheld.items():
        kept = report.documents.get(table, {}).get("deleted", 0)
        if kept:  # a table that lost nothing has nothing to withhold
            lines.append(
                f"  no deletes from {table} (--propagate-deletes): {reason};"
                f" its {kept} vanished documents are kept"
            )
    if report.refused:
        lines.append(
            f"  rows refused by the database: {len(report.refused)} (see `khala-stream dlq list`)"
        )
        lines += [f"    {t} {printable(k)}: {printable(r)}" for t, k, r in report.refused[:50]]
    lines.append(
        "Dry-run completed: no database writes were performed."
        if report.dry_run
        else "Import completed successfully."
    )
    return lines
