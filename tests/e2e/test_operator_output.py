"""What an operator reads (issue 24): summaries that say what happened, --json with the same
facts as the text, global options in either position, `counts` on a missing database, where
each dead letter came from, and `generate`'s count of what the importer reads."""

from __future__ import annotations

import copy
import re
import uuid
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.engine import make_url

from producers.generator import generate_export, load_reference_fixture, write_fixture_zip
from tests.e2e.harness import CliResult, env_for, khala, ok

_COUNTER = re.compile(r"^  ([a-z_]+):\s+(\d+)$")


def _facts(result: CliResult) -> dict[str, Any]:
    """The facts of a text summary, under the names --json uses."""
    facts: dict[str, Any] = {"counters": result.counters, "documents": {}, "ignored_tables": []}
    written: dict[str, int] = {}
    for line in result.stdout.splitlines():
        if line.startswith("  documents ") and "=" in line:
            table, rest = line[len("  documents ") :].split(": ", 1)
            facts["documents"][table] = {k: int(v) for k, v in (p.split("=") for p in rest.split())}
        elif match := re.match(r"^  (rows written|rows a real run would write): (.*)$", line):
            written = {} if match[2].startswith("none") else _pairs(match[2])
            facts["label"] = match[1]
        elif line.startswith("  other tables, not imported: "):
            facts["ignored_tables"] = line.split(": ", 1)[1].split(", ")
        elif match := re.match(r"^  rejected lines: (\d+) \((.*)\)$", line):
            facts["rejected"] = int(match[1])
            facts["set_aside"] = match[2] == "set aside in the dead-letter topic"
    facts["written"] = written
    return facts


def _pairs(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (p.split("=") for p in text.split())}


def _json_facts(data: dict[str, Any]) -> dict[str, Any]:
    dry = data["mode"] == "dry-run"
    return {
        "counters": data["counters"],
        "documents": {t: s for t, s in data["documents"].items() if any(s.values())},
        "written": data["rows_a_real_run_would_write" if dry else "rows_written"],
        "rejected": sum(data["rejected_lines"]["per_table"].values()),
        "set_aside": data["set_aside_in_dead_letter_topic"],
        "ignored_tables": data["ignored_tables"],
    }


def _without_receipts(path: Path) -> Path:
    tables = copy.deepcopy(load_reference_fixture("fixture-a"))
    tables["receipts"] = []
    write_fixture_zip(path, tables)
    return path


def test_a_merge_names_documents_not_in_the_export_and_deletes_only_on_request(
    fixture_a: Path, tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    ok(khala(["import-chat", str(fixture_a)], env))
    newer = _without_receipts(tmp_path / "newer.zip")

    merge = ok(khala(["import-chat", str(newer)], env))
    assert _facts(merge)["documents"]["receipts"]["not_in_export"] == 1
    assert "deleted=" not in merge.stdout  # nothing was deleted
    merge_json = orjson.loads(ok(khala(["import-chat", str(newer), "--json"], env)).stdout)
    assert merge_json["documents"]["receipts"]["not_in_export"] == 1
    assert "deleted" not in merge_json["documents"]["receipts"]

    dry = ok(khala(["import-chat", str(newer), "--propagate-deletes", "--dry-run"], env))
    assert _facts(dry)["documents"]["receipts"]["would_delete"] == 1
    assert "  rows a real run would write: run_events=1" in dry.stdout
    assert "rows written" not in dry.stdout and "deleted=" not in dry.stdout

    deleting = ok(khala(["import-chat", str(newer), "--propagate-deletes"], env))
    assert _facts(deleting)["documents"]["receipts"]["deleted"] == 1
    assert "  rows written: run_events=1" in deleting.stdout


def test_a_dry_run_says_what_a_real_run_would_write_and_set_aside(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = tmp_path / "edges.zip"
    generate_export(export, users=3, seed=5, edge_cases=True)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    dry = ok(khala(["import-chat", str(export), "--dry-run"], env))
    assert "rows written" not in dry.stdout
    assert "(set aside in the dead-letter topic)" not in dry.stdout
    assert re.search(r"^  rows a real run would write: \w+=\d+", dry.stdout, re.M)
    assert re.search(
        r"^  rejected lines: 7 \(a real run would set them aside in the dead-letter topic\)$",
        dry.stdout,
        re.M,
    )
    assert "(dry run: nothing was written)" in dry.stdout
    # Its phases show as they run, as an import's do (stderr, not a terminal).
    for phase in ("read_messages", "derive_identities", "derive_messages", "derive_run_events"):
        assert re.search(rf"^progress: {phase} done=\d+/\d+ finished", dry.stderr, re.M), phase
    data = orjson.loads(ok(khala(["import-chat", str(export), "--dry-run", "--json"], env)).stdout)
    assert data["rows_written"] == {} and data["set_aside_in_dead_letter_topic"] is False
    facts = _facts(dry)
    assert facts.pop("label") == "rows a real run would write"
    assert _json_facts(data) == facts


def test_json_carries_the_same_facts_as_the_text(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The same import into two fresh databases (own topics each): once as text, once --json."""
    export = tmp_path / "edges.zip"
    generate_export(export, users=3, seed=6, edge_cases=True)
    runs = []
    for name, extra in (("text", []), ("json", ["--json"])):
        url = f"sqlite+aiosqlite:///{tmp_path}/{name}.sqlite"
        env = env_for(kafka_bootstrap, f"{topic_prefix}-{name}", url)
        runs.append(ok(khala(["import-chat", str(export), *extra], env)))
    text, as_json = runs
    facts = _facts(text)
    assert facts.pop("label") == "rows written" and facts["written"]
    assert facts["set_aside"] is True and facts["rejected"] == 7
    assert "messageParts" in facts["ignored_tables"]
    assert _json_facts(orjson.loads(as_json.stdout)) == facts
    # The opening lines come first, before any of the work's output.
    assert text.stdout.startswith("Khala chat import starting...\n  source: ")


def test_global_options_work_after_the_command(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, "sqlite+aiosqlite:///nowhere/else.sqlite")
    ok(khala(["db", "init", "--database-url", sqlite_url], env))
    after = ok(khala(["counts", "-v", "--json", "--database-url", sqlite_url], env))
    before = ok(khala(["-v", "--json", "--database-url", sqlite_url, "counts"], env))
    assert orjson.loads(after.stdout)["tables"] == orjson.loads(before.stdout)["tables"]
    refused = khala(["counts", "--retry-deadline", "0", "--database-url", sqlite_url], env)
    assert refused.exit_code == 2 and "--retry-deadline must be above 0" in refused.stderr


def test_counts_on_a_database_that_does_not_exist_says_how_to_create_it(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_admin_url: str
) -> None:
    missing_pg = (
        make_url(pg_admin_url)
        .set(drivername="postgresql+asyncpg", database=f"absent_{uuid.uuid4().hex[:8]}")
        .render_as_string(hide_password=False)
    )
    for url in (f"sqlite+aiosqlite:///{tmp_path}/absent.sqlite", missing_pg):
        result = khala(["counts"], env_for(kafka_bootstrap, topic_prefix, url))
        assert result.exit_code == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("khala-stream: error: no database")
        assert "run `khala-stream db init` or an import first" in line
    assert not (tmp_path / "absent.sqlite").exists()


def test_dlq_list_says_which_export_and_run_each_letter_came_from(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = tmp_path / "edges.zip"
    generate_export(export, users=3, seed=7, edge_cases=True)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    imported = orjson.loads(ok(khala(["import-chat", str(export), "--json"], env)).stdout)
    run, sha = imported["run_id"], imported["export_sha256"]
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["total"] >= 7  # the rejected lines, and the documents without a key
    for letter in listed["letters"]:
        assert (letter["run_id"], letter["export_sha256"]) == (run, sha)
        assert letter["export_source"] == str(export)
    text = ok(khala(["dlq", "list"], env)).stdout
    shown = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(shown) == listed["total"]
    for line in shown:
        assert line.endswith(f"[export {export} (sha256 {sha[:12]}), run {run}]"), line


def test_generate_reports_the_documents_the_importer_reads(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = tmp_path / "edges.zip"
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    made = ok(khala(["generate", "--out", str(export), "--users", "4", "--edge-cases"], env))
    (n,) = re.findall(r": (\d+) documents for the importer", made.stdout)
    data = orjson.loads(
        ok(
            khala(["generate", "--out", str(export), "--users", "4", "--edge-cases", "--json"], env)
        ).stdout
    )
    assert data["documents"] == int(n) and data["other_tables_documents"] > 0
    validated = orjson.loads(ok(khala(["validate", str(export), "--json"], env)).stdout)
    assert validated["documents"] == int(n)
    dry = orjson.loads(ok(khala(["import-chat", str(export), "--dry-run", "--json"], env)).stdout)
    read = sum(v for k, v in dry["counters"].items() if k.startswith("source_"))
    assert read == int(n)
