"""The reference's text, field and payload rules, one by one (pure functions)."""

from __future__ import annotations

from itertools import islice

import pytest

from processors.autopilots import (
    autopilot_id_for,
    extract_blueprint,
    parse_allowed_hosts,
    profile_payload,
)
from processors.fields import int_field, is_uuid, php_truthy, to_timestamp, updated_at, usable_ms
from processors.linkage import Owner, default_title, run_row, title_candidate, title_from
from processors.text import (
    display_width,
    gravatar_url,
    handle_candidates,
    is_valid_email,
    limit,
    normalise_handle,
    placeholder_email,
)


@pytest.mark.parametrize(
    ("seed", "attempt", "expected"),
    [
        ("user_legacy_1", 0, "migrated+d549889e5c7634229232@openagents.local"),
        ("userlegacy1", 0, "migrated+8e42e671be20deff28ae@openagents.local"),
        ("user_legacy_1", 1, "migrated+7c1a322ee560a5fe168b@openagents.local"),
        ("user_legacy_1", 2, "migrated+189074b908f7bfffed8d@openagents.local"),
    ],
)
def test_placeholder_emails_match_the_reference(seed: str, attempt: int, expected: str) -> None:
    assert placeholder_email(seed, attempt) == expected


def test_email_validity_follows_email_validator_and_accepts_our_placeholders() -> None:
    assert is_valid_email("legacy@example.com")
    assert is_valid_email(placeholder_email("user_x"))
    assert not is_valid_email("someone@openagents.local")  # only our own placeholders
    assert not is_valid_email("not-an-email")
    assert not is_valid_email("a@b")


def test_gravatar_hashes_the_lower_cased_trimmed_email() -> None:
    expected = "https://www.gravatar.com/avatar/2151180fb863dfaeedff2cb9c9145d75?d=identicon"
    assert gravatar_url(" Legacy@Example.com ") == expected


def test_limit_counts_display_columns_and_right_trims_the_cut() -> None:
    assert limit("short", 120, "…") == "short"
    assert limit("a" * 121, 120, "…") == "a" * 120 + "…"
    assert limit("ab " + "c" * 200, 3, "…") == "ab…"  # the cut "ab " is right-trimmed
    wide = "漢" * 70  # 140 columns
    assert display_width(wide) == 140
    assert limit(wide, 120, "…") == "漢" * 60 + "…"
    assert limit("x" + "漢" * 60, 120) == "x" + "漢" * 59  # a wide char never straddles the cut


def test_titles_collapse_unicode_whitespace_and_fall_back_to_the_thread_id() -> None:
    seed = title_candidate({"threadId": "t", "role": "user", "text": " Plan\u2003the\n\nweekend "})
    assert seed is not None
    assert title_from(seed[2]) == "Plan the weekend"
    assert title_candidate({"threadId": "t", "role": "assistant", "text": "hi"}) is None
    assert title_candidate({"threadId": "t", "role": "user", "text": "  \t"}) is None
    assert title_candidate({"threadId": "t", "role": "user", "text": "x"}) == (
        "t",
        float("inf"),
        "x",
    )
    assert default_title("11111111-1111-1111-1111-111111111111") == "Conversation 11111111"


def test_handles_are_normalised_and_made_unique_within_64_characters() -> None:
    assert normalise_handle("Chris.Smith@Example.com-autopilot") == "chris-smith"
    assert normalise_handle("  ~~~  ") == "autopilot"
    assert normalise_handle("autopilot-12") == "autopilot-12"
    base = "h" * 64
    first, second, third = islice(handle_candidates(base), 3)
    assert (first, second, third) == (base, "h" * 62 + "-1", "h" * 62 + "-2")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (5.9, 5),
        ("12", 12),
        (" 7.5 ", 7),
        ("1e3", 1000),
        (True, None),
        ("x", None),
        (None, None),
    ],
)
def test_int_fields_truncate_numbers_and_numeric_strings(
    value: object, expected: int | None
) -> None:
    assert int_field({"v": value}, "v") == expected


def test_timestamps_fall_back_through_the_chain_and_drop_fractions() -> None:
    assert usable_ms({"t": 0}, "t") is None and usable_ms({"t": -5}, "t") is None
    assert usable_ms({"t": 10**20}, "t") is None  # beyond the year 9999
    assert to_timestamp(1735700020500) == "2025-01-01 02:53:40"
    doc = {"createdAtMs": "1735700000000", "_creationTime": 1.0}
    assert updated_at(doc, 0) == "2025-01-01 02:53:20"
    assert updated_at({}, 1735700001000) == "2025-01-01 02:53:21"  # the snapshot time


@pytest.mark.parametrize(
    ("value", "truthy"),
    [
        (True, True),
        (0, False),
        (2, True),
        ("", False),
        ("0", False),
        ("no", True),
        ([], False),
        ({"a": 1}, True),
        (None, False),
    ],
)
def test_cancel_requested_uses_php_truthiness(value: object, truthy: bool) -> None:
    assert php_truthy(value) is truthy


def test_run_status_mapping_and_completion_time() -> None:
    owner = Owner(user_id=1, autopilot_id="a", config_version=2)
    base = {"createdAtMs": 1735700010000, "updatedAtMs": 1735700020000}
    for status, mapped, completed in [
        ("streaming", "running", None),
        ("final", "completed", "2025-01-01 02:53:40"),
        ("error", "failed", "2025-01-01 02:53:40"),
        ("canceled", "canceled", "2025-01-01 02:53:40"),
        ("weird", "completed", "2025-01-01 02:53:40"),
    ]:
        row = run_row("r", "t", {**base, "status": status}, owner, 0)
        assert (row["status"], row["completed_at"]) == (mapped, completed)
    assert is_uuid("22222222-2222-2222-2222-22222222222A") and not is_uuid("run-1")


def test_profile_for_a_never_bootstrapped_blueprint_and_for_none() -> None:
    unknown = {"docs": {"user": {"name": "Unknown", "addressAs": "Unknown"}}}
    assert profile_payload(unknown, "Chris")["owner_display_name"] == "Unknown"
    empty = profile_payload(None, "")
    assert empty["owner_display_name"] == "Autopilot Owner"
    assert empty["persona_summary"] is None
    assert empty["onboarding_answers"]["bootstrapState"] == {}


def test_legacy_blueprint_shape_and_recency() -> None:
    found = extract_blueprint(
        {
            "threadId": "t",
            "docs": {"rules": {"body": "x"}},
            "bootstrapState": "no",
            "_creationTime": 9.5,
        },
        3,
    )
    assert found is not None
    thread, blueprint = found
    assert thread == "t" and blueprint.recency == 9
    assert blueprint.payload == {
        "docs": {"rules": {"body": "x"}},
        "bootstrapState": None,
        "memory": [],
    }
    assert extract_blueprint({"threadId": "t", "blueprint": None}, 1) is None


def test_allowed_hosts_and_deterministic_autopilot_ids() -> None:
    assert parse_allowed_hosts(" A.com, ,b.com,a.com ") == ["a.com", "b.com"]
    assert autopilot_id_for("user_1") == autopilot_id_for("user_1") != autopilot_id_for("user_2")
