"""Human text and --json output, and the mapping of errors to exit codes."""

from __future__ import annotations

import sys
from typing import Any

import orjson

from khala_app.pipeline import ImportReport
from khala_stream.import_runs import RunOptions
from khala_stream.terminal import printable


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def counter_line(key: str, value: int) -> str:
    """The reference format: two spaces, `key:` left-justified in 32 columns, the value."""
    return f"  {key + ':':<32} {value}"


def header_lines(source: str, options: RunOptions, *, dry_run: bool) -> list[str]:
    """The reference's opening lines, printed before the work starts."""
    o = options
    return [
        "Khala chat import starting...",
        f"  source: {printable(source)}",
        f"  mode: {'dry-run' if dry_run else 'write'}",
        f"  replace: {'yes' if o.replace else 'no'}",
        f"  resolve_workos_users: {'yes' if o.resolve_workos_users else 'no'}",
        f"  import_blueprints: {'no' if o.skip_blueprints else 'yes'}",
    ]


def summary_lines(report: ImportReport) -> list[str]:
    """The reference transcript (§7): header lines, the 22 counters, then our own lines."""
    return header_lines(report.source, report.options, dry_run=report.dry_run) + result_lines(
        report
    )


def result_lines(report: ImportReport) -> list[str]:
    """The transcript after the header: loaded rows, the 22 counters as the reference prints
    them, then the product's own lines. A dry run says what a real run would write and set
    aside, since it does neither."""
    o = report.options
    c = report.counters
    loaded = " ".join(
        f"{t}={c[f'source_{t}']}"
        for t in ("users", "threads", "runs", "messages", "receipts", "blueprints")
    )
    lines = [f"  Loaded source rows: {loaded}"]
    if o.replace and not report.dry_run:
        lines.append("  Truncated target chat tables (--replace).")
    lines += ["", "Khala chat import summary:"]
    lines += [counter_line(k, v) for k, v in c.items()]
    lines += [
        "",
        f"khala-stream: export sha256 {report.sha256}"
        + (f", run {report.run_id}" if report.run_id else "")
        + (" (dry run: nothing was written)" if report.dry_run else ""),
    ]
    for table, stats in report.document_stats().items():
        if any(stats.values()):
            counts = " ".join(f"{k}={v}" for k, v in stats.items())
            lines.append(f"  documents {table}: {counts}")
    written_label = "rows a real run would write" if report.dry_run else "rows written"
    if report.written:
        written = " ".join(f"{t}={n}" for t, n in sorted(report.written.items()))
        lines.append(f"  {written_label}: {written}")
    else:
        lines.append(f"  {written_label}: none (nothing changed)")
    if report.ignored_tables:  # in the export, not read by the importer
        ignored = ", ".join(printable(t) for t in report.ignored_tables)
        lines.append(f"  other tables, not imported: {ignored}")
    set_aside = (
        "a real run would set them aside in the dead-letter topic"
        if report.dry_run
        else "set aside in the dead-letter topic"
    )
    rejected = sum(report.rejected.values())
    if rejected:
        lines.append(f"  rejected lines: {rejected} ({set_aside})")
        lines += [f"    {printable(f)}:{n}: {r}" for f, n, r in report.rejected_lines]
    missing = sum(report.missing_key.values())
    if missing:
        lines.append(f"  documents without a key: {missing} ({set_aside})")
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
