"""`khala-stream generate`: synthetic Khala exports with the real document shapes.

Every entity is planned from its own `random.Random` seeded by (seed, entity), so each table
can be streamed on its own by re-planning the entities it needs: memory stays flat however
large the export, and the output is byte-identical for the same arguments (fixed entry times,
sorted entries, no wall clock). Shapes follow the Convex schema (reference §1.3); with
`edge_cases` the export also carries the anomalies the importer must survive (SPEC §3, §8).

Also here: `write_fixture_zip`, the reference test helper's ZIP layout (reference §8), and
`load_reference_fixture` for the shared fixture data.
"""

from __future__ import annotations

import os
import random
import unicodedata
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = [
    "EPOCH_MS",
    "GeneratedExport",
    "generate_export",
    "load_reference_fixture",
    "shared_dir",
    "write_fixture_zip",
]

EPOCH_MS: Final = 1_735_700_000_000  # 2025-01-01 02:53:20 UTC, the reference fixtures' epoch
_EDGE_AT: Final = EPOCH_MS + 30 * 86_400_000  # the edge block: a month in
_USER_GAP: Final = 600_000  # sign-ups ten minutes apart: a million users still fit in a DOS date
_THREAD_GAP: Final = 3_600_000
_MESSAGE_GAP: Final = (2_000, 90_000)
_STREAM_TIME: Final = (800, 30_000)
_FIXTURE_TIME: Final = (2025, 1, 2, 0, 0, 0)
_FLUSH_BYTES: Final = 1 << 20
_CONVEX_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
# Byte -> character tables: 256 is a multiple of 32, so every character is equally likely.
_TO_CONVEX: Final = _CONVEX_ALPHABET.encode("ascii") * 8
_TO_CROCKFORD: Final = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ" * 8
_ENV_SHARED: Final = "KHALA_SHARED_DIR"
_BUNDLED_REFERENCE: Final = Path(__file__).resolve().with_name("sample")


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedExport:
    """What `generate_export` wrote: documents (JSON objects) and malformed lines per table."""

    path: Path
    counts: dict[str, int]
    malformed: dict[str, int]
    size_bytes: int

    @property
    def total_documents(self) -> int:
        return sum(self.counts.values())


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    seed: int
    users: int
    threads_per_user: int
    messages_per_thread: int
    edge_cases: bool
    extra_tables: bool


@dataclass(slots=True, kw_only=True)
class _UserPlan:
    index: int
    convex_id: str
    creation_time: float
    user_id: str
    first: str
    last: str
    email: Any  # a string, None, or _MISSING
    created_ms: Any  # an int, or an edge-case value
    in_users_table: bool


@dataclass(slots=True, kw_only=True)
class _MessagePlan:
    index: int
    convex_id: str
    creation_time: float
    message_id: str
    role: str
    status: str
    run: int | None
    created_ms: int
    updated_ms: int


@dataclass(slots=True, kw_only=True)
class _RunPlan:
    index: int
    convex_id: str
    creation_time: float
    run_id: str
    message: _MessagePlan
    status: str
    cancel_requested: bool
    created_ms: int
    updated_ms: int
    receipts: int


@dataclass(slots=True, kw_only=True)
class _ThreadPlan:
    user: int
    index: int
    convex_id: str
    creation_time: float
    thread_id: str
    owner: str | None
    anon_key: str | None
    created_ms: int
    updated_ms: int
    messages: list[_MessagePlan] = field(default_factory=list)
    runs: list[_RunPlan] = field(default_factory=list)
    blueprint: str | None = None  # None, "object" or "legacy"


class _Missing:
    """Marks a field that the document leaves out altogether."""

    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Final = _Missing()


def _rng(cfg: _Config, *key: object) -> random.Random:
    # str seeds are hashed with sha512 by random.Random: stable across runs and platforms.
    return random.Random("/".join(str(part) for part in (cfg.seed, *key)))


def _uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _convex_id(rng: random.Random) -> str:
    # One random byte per character, its low 5 bits picking from Convex's id alphabet.
    return rng.getrandbits(256).to_bytes(32, "big").translate(_TO_CONVEX).decode("ascii")


def _workos_id(rng: random.Random) -> str:
    # WorkOS ids are "user_" + a 26-character ULID (Crockford base32, leading "01").
    raw = rng.getrandbits(192).to_bytes(24, "big").translate(_TO_CROCKFORD)
    return "user_01" + raw.decode("ascii")


def _creation(rng: random.Random, ms: int) -> float:
    return round(ms + rng.randrange(0, 40) + rng.random(), 4)


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


_FIRST: Final = (
    "Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Gustavo", "Hana", "Ivan", "Jun",
    "Kofi", "Lena", "Mateo", "Noor", "Olga", "Priya", "Quinn", "Rafael", "Sofia", "Tomás",
    "Uma", "Viktor", "Wei", "Ximena", "Yusuf", "Zoë", "Chris", "Amara", "Björn", "Saanvi",
)  # fmt: skip
_LAST: Final = (
    "Nakamura", "Okafor", "Silva", "Müller", "Kowalski", "Haddad", "Johansson", "Patel",
    "Fischer", "García", "Nguyen", "O'Brien", "Rossi", "Kim", "Dubois", "Ivanova", "Mensah",
    "Andersen", "Yamamoto", "Costa",
)  # fmt: skip
_DOMAINS: Final = ("example.com", "example.org", "example.net", "mail.example.com", "corp.test")


def _ascii(name: str) -> str:
    """Mail local parts as people pick them: accents folded, apostrophes dropped."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return folded.replace("'", "")


def _plan_user(cfg: _Config, u: int) -> _UserPlan:
    rng = _rng(cfg, "user", u)
    created = EPOCH_MS if u == 0 else EPOCH_MS + u * _USER_GAP + rng.randrange(0, _USER_GAP // 2)
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    if rng.random() < 0.85:
        user_id = _workos_id(rng)
    else:
        user_id = rng.choice(
            (
                f"userlegacy{u}",
                f"google-oauth2|{rng.randrange(10**20):020d}",
                f"github|{rng.randrange(10**8)}",
            )
        )
    # The user index in the local part keeps emails unique outside edge cases.
    local = _ascii(f"{first}.{last}").lower() + str(u)
    pick = rng.random()
    email: Any
    if pick < 0.72:
        email = f"{local}@{rng.choice(_DOMAINS)}"
    elif pick < 0.80:
        email = f"{_ascii(first)}.{_ascii(last)}{u}@{rng.choice(_DOMAINS)}"  # mixed case
    elif pick < 0.86:
        email = _MISSING
    elif pick < 0.90:
        email = None
    elif pick < 0.94:
        email = rng.choice(("", "   "))
    else:
        email = rng.choice((local, f"{local}@", f"{first} {last}@example.com", f"@{local}"))
    created_ms: Any = created
    in_users = True
    if cfg.edge_cases:
        if rng.random() < 0.05:
            in_users = False  # a thread owner that the users table never mentions
        if rng.random() < 0.05:
            created_ms = rng.choice((_MISSING, 0, str(created), "yesterday", -1, created + 0.75))
    return _UserPlan(
        index=u,
        convex_id=_convex_id(rng),
        creation_time=_creation(rng, created),
        user_id=user_id,
        first=first,
        last=last,
        email=email,
        created_ms=created_ms,
        in_users_table=in_users,
    )


def _plan_thread(cfg: _Config, user: _UserPlan, t: int) -> _ThreadPlan:
    rng = _rng(cfg, "thread", user.index, t)
    base = EPOCH_MS + user.index * _USER_GAP + _USER_GAP // 2
    created = base + t * _THREAD_GAP + rng.randrange(60_000, _THREAD_GAP // 2)
    anonymous = rng.random() < 0.08
    plan = _ThreadPlan(
        user=user.index,
        index=t,
        convex_id=_convex_id(rng),
        creation_time=_creation(rng, created),
        thread_id=_uuid4(rng),
        owner=None if anonymous else user.user_id,
        anon_key=f"anon:{_hex(rng, 32)}" if anonymous else None,
        created_ms=created,
        updated_ms=created,
    )
    m = cfg.messages_per_thread
    count = rng.randint(max(min(m, 2), m - m // 4), m + m // 4) if m > 0 else 0
    roles: list[str] = []
    if count and rng.random() < 0.04:
        roles.append("system")
    while len(roles) < count:
        roles.append("user" if not roles or roles[-1] != "user" else "assistant")
    clock = created
    for i, role in enumerate(roles):
        clock += rng.randrange(*_MESSAGE_GAP)
        updated = clock + (rng.randrange(*_STREAM_TIME) if role == "assistant" else 0)
        plan.messages.append(
            _MessagePlan(
                index=i,
                convex_id=_convex_id(rng),
                creation_time=_creation(rng, clock),
                message_id=_uuid4(rng),
                role=role,
                status="final",
                run=None,
                created_ms=clock,
                updated_ms=updated,
            )
        )
        clock = updated
    # Runs drive the last one or two assistant replies; older replies predate runs.
    assistants = [msg for msg in plan.messages if msg.role == "assistant"]
    wanted = 2 if rng.random() < 0.35 else 1
    for r, msg in enumerate(assistants[-wanted:]):
        last = r == min(wanted, len(assistants)) - 1
        status = "final"
        if last:
            status = rng.choices(("final", "error", "canceled", "streaming"), (82, 6, 5, 7))[0]
        run_id = _uuid4(rng)
        if cfg.edge_cases and rng.random() < 0.03:
            run_id = f"run_{_hex(rng, 12)}"  # pre-UUID run ids: the importer skips them
        msg.status = status
        msg.run = r
        run_created = msg.created_ms - rng.randrange(50, 1_500)
        plan.runs.append(
            _RunPlan(
                index=r,
                convex_id=_convex_id(rng),
                creation_time=_creation(rng, run_created),
                run_id=run_id,
                message=msg,
                status=status,
                cancel_requested=status == "canceled" or rng.random() < 0.02,
                created_ms=run_created,
                updated_ms=msg.updated_ms,
                receipts=rng.randint(0, 3),
            )
        )
    if cfg.edge_cases:
        for msg in plan.messages:
            if rng.random() < 0.02:
                msg.role = rng.choice(("tool", "Assistant", "USER", "bot"))
    plan.updated_ms = max([created, *(msg.updated_ms for msg in plan.messages)])
    if plan.owner is not None and rng.random() < 0.45:
        plan.blueprint = "legacy" if rng.random() < 0.25 else "object"
    return plan


def _snapshot_time(cfg: _Config) -> tuple[int, int, int, int, int, int]:
    """A fixed entry time just after the newest timestamp the plans can produce."""
    m = cfg.messages_per_thread
    newest = (
        EPOCH_MS
        + max(cfg.users, 1) * _USER_GAP
        + max(cfg.threads_per_user, 1) * _THREAD_GAP
        + (m + m // 4 + 1) * (_MESSAGE_GAP[1] + _STREAM_TIME[1])
    )
    if cfg.edge_cases:
        newest = max(newest, _EDGE_AT + 40 * 86_400_000)  # the edge block's string stamps too
    moment = datetime.fromtimestamp(newest // 1000 + 86_400, tz=UTC)
    if moment.year > 2107:  # the last year a DOS timestamp can hold
        return (2107, 12, 31, 23, 59, 58)
    second = moment.second - moment.second % 2  # DOS times have a 2-second resolution
    return (moment.year, moment.month, moment.day, moment.hour, moment.minute, second)


# --------------------------------------------------------------------------- text

_TOPICS: Final = (
    "my Lightning node", "the L402 paywall", "a Rust borrow checker error", "our Laravel queue",
    "this PostgreSQL query plan", "the onboarding flow", "a Kafka consumer group",
    "my weekly planning", "the invoice from last month", "a React hydration warning",
    "the Nostr relay list", "a flaky integration test", "the migration runbook",
)  # fmt: skip
_ASKS: Final = (
    "Can you help me debug {t}?", "Summarize what we discussed about {t}.",
    "What is the fastest way to fix {t}?", "Explain {t} like I'm new to it.",
    "Write a checklist for {t}.", "Why does {t} keep failing on Mondays?",
    "Compare two approaches to {t} and recommend one.", "hey, quick q about {t}",
)  # fmt: skip
_SENTENCES: Final = (
    "Start by reproducing the problem with the smallest possible input.",
    "The logs point at a timeout rather than a logic error.",
    "I would keep the change behind a flag until it has run for a week.",
    "Here is the short version: the cache was stale, not the data.",
    "You can verify this by running the same query with EXPLAIN ANALYZE.",
    "That setting only applies after a restart, which explains the delay.",
    "Two options stand out, and the second one is cheaper to undo.",
    "Let me know if you want me to draft the message to your team.",
    "The invoice expired before the payment was attempted.",
    "Nothing here needs an irreversible change; we can roll back at any point.",
)  # fmt: skip
_UNICODE: Final = (
    "Café résumé naïve façade — déjà vu? 🙂",
    "Grüße aus München! Können wir das Meeting auf Donnerstag verschieben? 🚀",
    "¿Puedes revisar el informe de ventas del trimestre? Gracias 🙏",
    "Привет! Помоги, пожалуйста, с настройкой сервера.",
    "مرحبا، هل يمكنك مساعدتي في كتابة رسالة؟",
    "Zażółć gęślą jaźń — test polskich znaków ✅",
)  # fmt: skip
_CJK: Final = (
    "请帮我总结一下上周关于闪电网络节点的讨论，并列出需要跟进的事项。",
    "このエラーメッセージの意味を教えてください。データベースの接続がタイムアウトします。",
    "지난 회의 내용을 정리해 주시겠어요? 다음 주까지 보고서를 제출해야 합니다.",
    "我们的数据迁移计划需要在周五之前完成，请给出详细的步骤。",
)  # fmt: skip
_CODE: Final = (
    "```python\nasync def handler(event: dict) -> None:\n"
    "    await queue.put(event)\n    log.info(\"queued %s\", event[\"id\"])\n```",
    "```sql\nSELECT thread_id, count(*)\nFROM messages\nGROUP BY thread_id\n"
    "ORDER BY 2 DESC\nLIMIT 10;\n```",
    "```bash\nkhala-stream validate export.zip --json | jq .tables\n```",
)  # fmt: skip


def _user_text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.55:
        return rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
    if pick < 0.72:
        ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
        return ask + " " + " ".join(rng.sample(_SENTENCES, rng.randint(1, 3)))
    if pick < 0.82:
        lines = [rng.choice(_ASKS).format(t=rng.choice(_TOPICS)) for _ in range(3)]
        return "I have a few things:\n- " + "\n- ".join(lines)
    if pick < 0.92:
        return rng.choice(_UNICODE)
    return rng.choice(_CJK)


def _assistant_text(rng: random.Random) -> str:
    paragraphs = [
        " ".join(rng.choices(_SENTENCES, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    if rng.random() < 0.08:  # the occasional long answer with code
        count = rng.randint(6, 20)
        paragraphs = [" ".join(rng.choices(_SENTENCES, k=rng.randint(4, 9))) for _ in range(count)]
        paragraphs.insert(rng.randrange(len(paragraphs)), rng.choice(_CODE))
    if rng.random() < 0.05:
        paragraphs.append(rng.choice(_CJK))
    return "\n\n".join(paragraphs)


def _message_text(cfg: _Config, thread: _ThreadPlan, msg: _MessagePlan) -> Any:
    rng = _rng(cfg, "text", thread.user, thread.index, msg.index)
    if msg.role == "system":
        return "You are Autopilot, a calm and direct assistant."
    if msg.role != "assistant":
        return _user_text(rng)
    text = _assistant_text(rng)
    if msg.status == "streaming":
        return text[: rng.randrange(0, max(len(text) // 2, 1))]
    if msg.status == "canceled":
        return text[: len(text) // 3]
    if msg.status == "error":
        return rng.choice((_MISSING, "", "Sorry, something went wrong while answering."))
    return text


# --------------------------------------------------------------------------- documents


def _put(doc: dict[str, Any], key: str, value: Any) -> None:
    if not isinstance(value, _Missing):
        doc[key] = value


def _user_doc(user: _UserPlan, default_thread: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": user.convex_id,
        "_creationTime": user.creation_time,
        "userId": user.user_id,
    }
    _put(doc, "email", user.email)
    _put(doc, "createdAtMs", user.created_ms)
    if default_thread is not None:
        doc["defaultThreadId"] = default_thread
    return doc


def _thread_doc(thread: _ThreadPlan) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": thread.convex_id,
        "_creationTime": thread.creation_time,
        "threadId": thread.thread_id,
    }
    if thread.owner is not None:
        doc["ownerId"] = thread.owner
    if thread.anon_key is not None:
        doc["anonKey"] = thread.anon_key
    doc["createdAtMs"] = thread.created_ms
    doc["updatedAtMs"] = thread.updated_ms
    return doc


def _run_doc(thread: _ThreadPlan, run: _RunPlan) -> dict[str, Any]:
    return {
        "_id": run.convex_id,
        "_creationTime": run.creation_time,
        "threadId": thread.thread_id,
        "runId": run.run_id,
        "assistantMessageId": run.message.message_id,
        "status": run.status,
        "cancelRequested": run.cancel_requested,
        "createdAtMs": run.created_ms,
        "updatedAtMs": run.updated_ms,
    }


def _message_doc(cfg: _Config, thread: _ThreadPlan, msg: _MessagePlan) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": msg.convex_id,
        "_creationTime": msg.creation_time,
        "threadId": thread.thread_id,
        "messageId": msg.message_id,
        "role": msg.role,
        "status": msg.status,
    }
    _put(doc, "text", _message_text(cfg, thread, msg))
    if msg.run is not None:
        doc["runId"] = thread.runs[msg.run].run_id
    doc["createdAtMs"] = msg.created_ms
    doc["updatedAtMs"] = msg.updated_ms
    return doc


_MODELS: Final = ("openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "moonshotai/kimi-k2")
_TOOLS: Final = ("web.search", "web.fetch", "lightning.l402_fetch", "echo", "calendar.lookup")
_SIGNATURES: Final = (
    "@openagents/autopilot/blueprint/SelectTool.v1",
    "@openagents/autopilot/canary/RecapThread.v1",
    "@openagents/autopilot/rlm/SummarizeThread.v1",
)  # fmt: skip


def _receipt_docs(cfg: _Config, thread: _ThreadPlan, run: _RunPlan) -> Iterator[dict[str, Any]]:
    rng = _rng(cfg, "receipt", thread.user, thread.index, run.index)
    span = max(run.updated_ms - run.created_ms, 1)
    for j in range(run.receipts):
        created = run.created_ms + span * (j + 1) // (run.receipts + 1)
        kind = rng.choices(("model", "tool", "dse.predict"), (50, 35, 15))[0]
        doc: dict[str, Any] = {
            "_id": _convex_id(rng),
            "_creationTime": _creation(rng, created),
            "threadId": thread.thread_id,
            "runId": run.run_id,
            "kind": kind,
        }
        if kind == "model":
            tokens_in, tokens_out = rng.randrange(200, 9_000), rng.randrange(20, 2_000)
            doc["json"] = {
                "provider": "openrouter",
                "model": rng.choice(_MODELS),
                "usage": {
                    "inputTokens": tokens_in,
                    "outputTokens": tokens_out,
                    "totalTokens": tokens_in + tokens_out,
                },
                "finishReason": rng.choice(("stop", "stop", "stop", "length", "tool-calls")),
                "latencyMs": rng.randrange(300, 20_000),
            }
        elif kind == "tool":
            ok = rng.random() < 0.9
            doc["json"] = {
                "tool": rng.choice(_TOOLS),
                "input": {"query": rng.choice(_TOPICS)},
                "ok": ok,
                "durationMs": rng.randrange(5, 8_000),
                **({} if ok else {"error": {"message": "upstream returned 502"}}),
            }
        else:
            signature, compiled = rng.choice(_SIGNATURES), f"sha256:{_hex(rng, 64)}"
            doc["json"] = {
                "strategyId": rng.choice(("direct.v1", "rlm_lite.v1")),
                "result": {"tag": "Ok"},
                "timing": {"durationMs": rng.randrange(50, 4_000)},
                "budget": {"limits": {"maxLmCalls": 20}, "usage": {"lmCalls": rng.randint(1, 5)}},
            }
            doc["signatureId"] = signature
            doc["compiled_id"] = compiled
        if rng.random() < 0.7:
            doc["receiptId"] = f"rcpt_{_hex(rng, 20)}"
        doc["createdAtMs"] = created
        yield doc


def _blueprint_payload(
    rng: random.Random, thread: _ThreadPlan, user: _UserPlan
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """(bootstrapState, docs, memory) in the Convex default template's shape."""
    bootstrapped = rng.random() < 0.8
    name = user.first if bootstrapped else "Unknown"
    started = thread.created_ms + rng.randrange(1_000, 60_000)
    state = {
        "userId": thread.owner,
        "threadId": thread.thread_id,
        "status": "complete" if bootstrapped else rng.choice(("pending", "in_progress")),
        "stage": None if bootstrapped else rng.choice(("ask_user_name", "ask_vibe")),
        "startedAt": started,
        "completedAt": started + rng.randrange(10_000, 300_000) if bootstrapped else None,
        "templateVersion": 5.0,
    }
    vibe = rng.choice(("calm, direct, pragmatic", "direct and practical", "warm and curious"))
    stamp = {"updatedAt": started, "updatedBy": rng.choice(("agent", "user"))}
    docs: dict[str, Any] = {
        "rules": {"version": 1, "body": "You are Autopilot. Prefer verification over guessing."},
        "bootstrap": {"version": 1, "body": "Ask the user's name, then how to address them."},
        "identity": {
            "version": 1,
            "name": "Autopilot",
            "creature": rng.choice(("assistant", "familiar", "ghost in the machine")),
            "vibe": vibe,
            "emoji": rng.choice(("🤖", "🦊", "⚡", None)),
            "avatar": None,
            **stamp,
        },
        "user": {
            "version": 1,
            "name": name,
            "addressAs": name if rng.random() < 0.7 else f"{name} {user.last}",
            "pronouns": rng.choice((None, "she/her", "he/him", "they/them")),
            "timeZone": rng.choice((None, "Europe/Berlin", "America/Chicago", "Asia/Tokyo")),
            "notes": rng.choice((None, "Prefers short answers.", "Works nights.")),
            "context": rng.choice((None, "Runs a small Lightning shop.", "Backend engineer.")),
            **stamp,
        },
        "character": {
            "version": 1,
            "coreTruths": rng.sample(
                [
                    "Prefer verification over guessing",
                    "Be useful before being clever",
                    "Say what you do not know",
                ],
                rng.randint(1, 3),
            ),
            "boundaries": ["No irreversible changes without explicit approval"],
            "vibe": rng.choice((None, vibe)),
            "continuity": rng.choice((None, "Keep a durable profile.")),
            **stamp,
        },
        "tools": {"version": 1, "notes": "Lightning tools need approval."},
        "heartbeat": {"version": 1, "notes": ""},
    }
    memory: list[Any] = []
    if rng.random() < 0.3:
        memory.append({"kind": "fact", "text": f"{name} asked about {rng.choice(_TOPICS)}."})
    return state, docs, memory


def _blueprint_doc(cfg: _Config, thread: _ThreadPlan, user: _UserPlan) -> dict[str, Any]:
    rng = _rng(cfg, "blueprint", thread.user, thread.index)
    updated = thread.updated_ms + rng.randrange(1_000, 120_000)
    state, docs, memory = _blueprint_payload(rng, thread, user)
    doc: dict[str, Any] = {
        "_id": _convex_id(rng),
        "_creationTime": _creation(rng, thread.created_ms),
        "threadId": thread.thread_id,
    }
    if thread.blueprint == "legacy":
        # Before the `blueprint` wrapper, the payload lived at the top level.
        if rng.random() < 0.5:
            doc["blueprint"] = None
        doc.update({"docs": docs, "bootstrapState": state, "memory": memory})
    else:
        doc["blueprint"] = {"bootstrapState": state, "docs": docs, "memory": memory}
    doc["updatedAtMs"] = updated
    return doc


def _message_part_docs(cfg: _Config, thread: _ThreadPlan) -> Iterator[dict[str, Any]]:
    rng = _rng(cfg, "parts", thread.user, thread.index)
    for run in thread.runs:
        if rng.random() >= 0.25:  # most streamed parts were compacted away after the run
            continue
        text = _message_text(cfg, thread, run.message)
        text = text if isinstance(text, str) else ""
        pieces = rng.randint(1, 3)
        step = max(len(text) // pieces, 1)
        for seq in range(pieces):
            created = run.created_ms + (seq + 1) * 250
            yield {
                "_id": _convex_id(rng),
                "_creationTime": _creation(rng, created),
                "threadId": thread.thread_id,
                "runId": run.run_id,
                "messageId": run.message.message_id,
                "seq": seq,
                "kind": "text-delta",
                "delta": text[seq * step : (seq + 1) * step if seq < pieces - 1 else None],
                "createdAtMs": created,
            }


def _invoice_docs(cfg: _Config, user: _UserPlan) -> Iterator[dict[str, Any]]:
    rng = _rng(cfg, "invoices", user.index)
    if rng.random() >= 0.3:
        return
    for _ in range(rng.randint(1, 2)):
        created = EPOCH_MS + user.index * _USER_GAP + rng.randrange(_USER_GAP, 20 * _USER_GAP)
        sats = rng.choice((21, 100, 1_000, 2_100, 50_000))
        status = rng.choice(("paid", "paid", "pending", "expired"))
        doc: dict[str, Any] = {
            "_id": _convex_id(rng),
            "_creationTime": _creation(rng, created),
            "ownerId": user.user_id,
            "paymentHash": _hex(rng, 64),
            "amountMsats": sats * 1000,
            "bolt11": f"lnbc{sats}0n1p" + "".join(rng.choices(_CONVEX_ALPHABET, k=180)),
            "memo": rng.choice(("L402 access", "Tip", "API credits")),
            "status": status,
            "createdAtMs": created,
        }
        if status == "paid":
            doc["paidAtMs"] = created + rng.randrange(1_000, 60_000)
        yield doc


# --------------------------------------------------------------------------- edge cases


class _Raw:
    """A line written as given (malformed on purpose, or with a CRLF ending)."""

    __slots__ = ("data", "is_document")

    def __init__(self, data: bytes, *, is_document: bool = False) -> None:
        self.data = data
        self.is_document = is_document


_Row = dict[str, Any] | _Raw


class _EdgeIds:
    """Ids for the edge block, drawn from its own seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.tick = 0

    def uuid(self) -> str:
        return _uuid4(self.rng)

    def convex(self) -> tuple[str, float]:
        self.tick += 1
        return _convex_id(self.rng), _EDGE_AT + self.tick + 0.5


def _edge_doc(ids: _EdgeIds, **fields: Any) -> dict[str, Any]:
    convex_id, creation = ids.convex()
    doc: dict[str, Any] = {"_id": convex_id, "_creationTime": creation}
    for key, value in fields.items():
        _put(doc, key, value)
    return doc


def _edge_block(cfg: _Config) -> dict[str, list[_Row]]:
    """A fixed set of anomalies, appended to each table after the regular rows.

    Every anomaly the SPEC and the reference name has at least one instance here, however
    small the export. Duplicates come last, so that the later line wins (SPEC §8.2).
    """
    ids = _EdgeIds(_rng(cfg, "edge"))
    at = _EDGE_AT
    conflict_a, conflict_b, ghost = (_workos_id(ids.rng) for _ in range(3))
    stamps = "edge-timestamps"

    users: list[dict[str, Any]] = [
        # The same email in two cases: a conflict once lower-cased (SPEC §3.10).
        _edge_doc(ids, userId=conflict_a, email="Conflict.Case@Example.com", createdAtMs=at),
        _edge_doc(ids, userId=conflict_b, email="conflict.case@example.com", createdAtMs=at + 1),
        _edge_doc(ids, userId=stamps, email="  Stamps@Example.net ", createdAtMs="1738378123000"),
        *(
            _edge_doc(ids, userId=f"edge-ts-{n}", createdAtMs=value)
            for n, value in enumerate((0, "soon", -5, _MISSING, 1738378124999.9))
        ),
        _edge_doc(ids, email="no-user-id@example.com", createdAtMs=at),
        _edge_doc(ids, userId=12345, createdAtMs=at),
    ]

    wide, long_, ghosted, stamped, anon = (ids.uuid() for _ in range(5))
    threads: list[dict[str, Any]] = [
        _edge_doc(
            ids, threadId=wide, ownerId=conflict_a, createdAtMs=at + 20_000, updatedAtMs=at + 90_000
        ),
        _edge_doc(
            ids,
            threadId=long_,
            ownerId=conflict_a,
            createdAtMs=at + 21_000,
            updatedAtMs=at + 90_000,
        ),
        # Owned by a user the users table never mentions.
        _edge_doc(
            ids, threadId=ghosted, ownerId=ghost, createdAtMs=at + 22_000, updatedAtMs=at + 90_000
        ),
        _edge_doc(ids, threadId=stamped, ownerId=stamps, updatedAtMs="1738378400000"),
        _edge_doc(
            ids,
            threadId=anon,
            anonKey=f"anon:{_hex(ids.rng, 32)}",
            createdAtMs=at + 25_000,
            updatedAtMs=at + 26_000,
        ),
        _edge_doc(ids, threadId=ids.uuid(), ownerId="  ", createdAtMs=at + 26_000),
        _edge_doc(ids, threadId=ids.uuid(), ownerId=42, createdAtMs=at + 27_000),
    ]

    def message(thread: str, role: Any, text: Any, ms: Any, run: Any = _MISSING) -> dict[str, Any]:
        return _edge_doc(
            ids,
            threadId=thread,
            messageId=ids.uuid(),
            role=role,
            status="final",
            text=text,
            runId=run,
            createdAtMs=ms,
        )

    # Titles past 120 display columns: wide CJK, and long text with odd whitespace.
    cjk_title = "長いタイトルのテスト：" + "请帮我总结这个对话的重点内容" * 7
    long_title = (
        "  Please  review\tthe\u3000following migration plan\u2028carefully:\n\n"
        + "step by step, checking every table and every index along the way; " * 6
    )
    odd_run = f"run_{_hex(ids.rng, 10)}"  # not UUID-shaped: the importer skips it
    upper_run = ids.uuid().upper()  # UUID-shaped in upper case still counts as a UUID
    over_long = message(stamped, "user", "an id longer than the column", at + 35_000)
    over_long["messageId"] = "msg_" + "x" * 60
    no_id = message(wide, "user", "no messageId", at + 37_000)
    del no_id["messageId"]
    messages: list[dict[str, Any]] = [
        message(wide, "user", cjk_title, at + 30_000),
        message(wide, "assistant", "了解しました。🙂\u2028Line two.", at + 31_000),
        message(long_, "user", long_title, at + 32_000),
        message(long_, "user", "an earlier-looking message without a time", _MISSING),
        message(long_, "user", "   ", at + 1),  # blank: never a title
        message(ghosted, "user", "Who owns this thread?", at + 33_000),
        message(ghosted, "assistant", "Nobody in users.", at + 34_000, odd_run),
        message(ghosted, "tool", "tool output", at + 34_500),
        message(ghosted, "Assistant", "wrong case", at + 34_600),
        message(ghosted, _MISSING, "no role", at + 34_700),
        message(ghosted, 7, "numeric role", at + 34_800),
        message(ghosted, "assistant", 42, at + 34_900, upper_run),
        message(stamped, "user", "timestamps as strings", "1738378500000"),
        message(stamped, "assistant", "zero time", 0),
        message(stamped, "system", "negative time", -1_000),
        over_long,
        message(anon, "user", "anonymous thread message", at + 36_000),
        no_id,
    ]

    def run(thread: str, run_id: str, status: Any, ms: Any) -> dict[str, Any]:
        # Truthiness the PHP way (SPEC §8.4): numbers, strings, empty and non-empty containers.
        cancel: Any = ids.rng.choice((0, 1, "0", "yes", [], {"a": 1}))
        updated = ms if isinstance(ms, int) and ms > 0 else at + 40_000
        return _edge_doc(
            ids,
            threadId=thread,
            runId=run_id,
            assistantMessageId=ids.uuid(),
            status=status,
            cancelRequested=cancel,
            createdAtMs=ms,
            updatedAtMs=updated,
        )

    good_run = ids.uuid()
    runs: list[dict[str, Any]] = [
        run(wide, good_run, "final", at + 31_000),
        run(ghosted, odd_run, "final", at + 34_000),
        run(ghosted, upper_run, "paused", at + 34_900),  # a status the mapping does not know
        run(stamped, ids.uuid(), _MISSING, 0),
        run(ids.uuid(), ids.uuid(), "final", at + 38_000),  # its thread is not in the export
    ]

    def receipt(thread: str, run_id: str, kind: Any, payload: Any, ms: Any) -> dict[str, Any]:
        return _edge_doc(
            ids, threadId=thread, runId=run_id, kind=kind, json=payload, createdAtMs=ms
        )

    receipts: list[dict[str, Any]] = [
        # Same payload within one second: still two events (SPEC §3.4).
        receipt(wide, good_run, "tool", {"tool": "echo", "ok": True}, at + 40_100),
        receipt(wide, good_run, "tool", {"tool": "echo", "ok": True}, at + 40_600),
        receipt(wide, good_run, "mystery", [1, 2, 3], at + 40_700),
        receipt(wide, good_run, _MISSING, None, at + 40_800),
        receipt(wide, good_run, "model", {}, _MISSING),
        receipt(ghosted, odd_run, "tool", {"tool": "x"}, at + 41_000),
        receipt(stamped, ids.uuid(), "dse.predict", {"ok": 1}, "1738378600000"),
        receipt(stamped, ids.uuid(), "model", "just a string", -7),
    ]

    def blueprint(thread: str, name: str, updated: Any, *, legacy: bool = False) -> dict[str, Any]:
        docs = {
            "user": {"name": name, "addressAs": name},
            "identity": {"name": "Autopilot", "vibe": "calm and direct"},
            "character": {"coreTruths": ["Be kind"]},
            "rules": {"body": f"You are Autopilot for {name}."},
        }
        if legacy:
            return _edge_doc(
                ids,
                threadId=thread,
                docs=docs,
                bootstrapState="not an object",
                memory=None,
                updatedAtMs=updated,
            )
        payload = {"bootstrapState": {"status": "complete"}, "docs": docs, "memory": []}
        return _edge_doc(ids, threadId=thread, blueprint=payload, updatedAtMs=updated)

    tie = at + 50_000
    no_payload = blueprint(stamped, "Nothing", at + 60_000)
    no_payload["blueprint"] = "not an object"
    blueprints: list[dict[str, Any]] = [
        # Recency ties: across two threads of one owner, and within one thread.
        blueprint(wide, "Tie Wide", tie),
        blueprint(long_, "Tie Long A", tie),
        blueprint(long_, "Tie Long B", tie, legacy=True),
        blueprint(stamped, "No Time", _MISSING),
        blueprint(ghosted, "A" * 200 + " 名前" * 40, at + 50_100),
        no_payload,
    ]

    # Later lines with an earlier line's key and different content.
    users.append({**users[0], "email": "conflict.a.second@example.com"})
    threads.append({**threads[0], "updatedAtMs": at + 95_000})
    messages.append({**messages[1], "text": "Edited later: the last line wins."})
    runs.append({**runs[0], "status": "error"})
    receipts.append({**receipts[0], "json": {"tool": "echo", "ok": False, "edited": True}})
    blueprints.append({**blueprints[0], "updatedAtMs": tie - 1})
    if cfg.users > 0:
        # A duplicate of a regular document, far from its original line.
        user0 = _plan_user(cfg, 0)
        thread0 = _plan_thread(cfg, user0, 0) if cfg.threads_per_user else None
        repeat = _user_doc(user0, thread0.thread_id if thread0 else None)
        users.append({**repeat, "email": f"re-exported.{user0.index}@example.org"})
        if thread0 is not None:
            threads.append({**_thread_doc(thread0), "updatedAtMs": thread0.updated_ms + 1_000})

    out: dict[str, list[_Row]] = {
        "users": [*users],
        "threads": [*threads],
        "runs": [*runs],
        "messages": [*messages],
        "receipts": [*receipts],
        "blueprints": [*blueprints],
    }
    # A valid document with a CRLF line ending.
    crlf = _edge_doc(ids, userId="edge-crlf", email="crlf@example.com", createdAtMs=at + 600)
    out["users"].append(_Raw(orjson.dumps(crlf) + b"\r", is_document=True))
    return out


def _malformed_lines(table: str) -> list[_Row]:
    """Lines injected after a table's first row (edge cases only)."""
    lines: dict[str, list[bytes]] = {
        "users": [b'{"_id": "broken", "userId": ', b"", b" \t "],
        "threads": [b'["not", "an", "object"]'],
        "messages": [b"", b'{"threadId": "x", "text": "unterminated}', b"42", b"null"],
        "receipts": [b'{"_id": "bad-utf8", "json": "\xff\xfe"}', b'"a string"'],
    }
    return [_Raw(line) for line in lines.get(table, [])]


# --------------------------------------------------------------------------- tables


_CHAT_ENTRY_TABLES: Final = ("users", "threads", "runs", "messages", "receipts", "blueprints")


def _users(cfg: _Config) -> Iterator[_Row]:
    for u in range(cfg.users):
        user = _plan_user(cfg, u)
        if not user.in_users_table:
            continue
        first = _plan_thread(cfg, user, 0) if cfg.threads_per_user else None
        default = first.thread_id if first is not None and first.owner is not None else None
        yield _user_doc(user, default)


def _threads(cfg: _Config) -> Iterator[_ThreadPlan]:
    for u in range(cfg.users):
        user = _plan_user(cfg, u)
        for t in range(cfg.threads_per_user):
            yield _plan_thread(cfg, user, t)


def _table_rows(cfg: _Config, table: str) -> Iterator[_Row]:
    if table == "users":
        yield from _users(cfg)
    elif table == "threads":
        yield from (_thread_doc(thread) for thread in _threads(cfg))
    elif table == "runs":
        for thread in _threads(cfg):
            yield from (_run_doc(thread, run) for run in thread.runs)
    elif table == "messages":
        for thread in _threads(cfg):
            yield from (_message_doc(cfg, thread, msg) for msg in thread.messages)
    elif table == "receipts":
        for thread in _threads(cfg):
            for run in thread.runs:
                yield from _receipt_docs(cfg, thread, run)
    elif table == "blueprints":
        for u in range(cfg.users):
            user = _plan_user(cfg, u)
            for t in range(cfg.threads_per_user):
                thread = _plan_thread(cfg, user, t)
                if thread.blueprint is not None:
                    yield _blueprint_doc(cfg, thread, user)
    elif table == "messageParts":
        for thread in _threads(cfg):
            yield from _message_part_docs(cfg, thread)
    elif table == "lightningInvoices":
        for u in range(cfg.users):
            yield from _invoice_docs(cfg, _plan_user(cfg, u))
    else:
        raise ValueError(f"unknown table {table}")


def _estimated_bytes(cfg: _Config, table: str) -> int:
    """A generous upper bound of an entry's size, so ZIP64 is chosen before writing."""
    threads = cfg.users * cfg.threads_per_user
    rows = {
        "users": cfg.users,
        "threads": threads,
        "runs": threads * 2,
        "messages": threads * (cfg.messages_per_thread * 2 + 2),
        "receipts": threads * 6,
        "blueprints": threads,
        "messageParts": threads * 8,
        "lightningInvoices": cfg.users * 2,
    }[table]
    per_row = 16_384 if table == "messages" else 4_096
    return (rows + 64) * per_row


def _entry_info(name: str, date_time: tuple[int, int, int, int, int, int]) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, on every platform, so the bytes do not depend on the host
    info.external_attr = 0o644 << 16
    return info


def _write_entry(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, rows: Iterable[_Row], estimate: int
) -> tuple[int, int]:
    """Stream rows into one entry; returns (documents, malformed lines)."""
    info.file_size = estimate  # zipfile picks ZIP64 from this before the first byte
    documents = malformed = 0
    buffer = bytearray()
    with archive.open(info, "w") as entry:
        for row in rows:
            if isinstance(row, _Raw):
                buffer += row.data
                if row.is_document:
                    documents += 1
                elif row.data.strip():
                    malformed += 1
            else:
                buffer += orjson.dumps(row)
                documents += 1
            buffer += b"\n"
            if len(buffer) >= _FLUSH_BYTES:
                entry.write(buffer)
                buffer.clear()
        entry.write(buffer)
    return documents, malformed


def _with_edges(rows: Iterator[_Row], injected: list[_Row], appended: list[_Row]) -> Iterator[_Row]:
    injected_done = False
    for row in rows:
        yield row
        if not injected_done:
            yield from injected
            injected_done = True
    if not injected_done:
        yield from injected
    yield from appended


def _table_registry(cfg: _Config) -> list[dict[str, Any]]:
    return [{"name": name, "id": 10_001 + n} for n, name in enumerate(_tables_in(cfg))]


def _tables_in(cfg: _Config) -> list[str]:
    extra = ["messageParts", "lightningInvoices"] if cfg.extra_tables else []
    return sorted([*_CHAT_ENTRY_TABLES, *extra])


_README: Final = (
    "This is a Khala snapshot export.\n"
    "Each table is a folder holding documents.jsonl, one JSON document per line.\n"
    "Generated by khala-stream generate (synthetic data).\n"
)


def generate_export(
    out: Path,
    *,
    users: int = 20,
    seed: int = 1,
    threads_per_user: int = 3,
    messages_per_thread: int = 8,
    edge_cases: bool = False,
    extra_tables: bool = True,
) -> GeneratedExport:
    """Write a synthetic export ZIP to `out`; the same arguments give the same bytes."""
    if min(users, threads_per_user, messages_per_thread) < 0:
        raise ValueError("users, threads_per_user and messages_per_thread must be >= 0")
    cfg = _Config(
        seed=seed,
        users=users,
        threads_per_user=threads_per_user,
        messages_per_thread=messages_per_thread,
        edge_cases=edge_cases,
        extra_tables=extra_tables,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    date_time = _snapshot_time(cfg)
    edges = _edge_block(cfg) if edge_cases else {}
    counts: dict[str, int] = {}
    malformed: dict[str, int] = {}
    # Written beside the target and renamed, so a reader never sees half an export.
    partial = out.with_name(out.name + ".partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            if extra_tables:
                # Real Convex exports carry a README and a `_tables` registry beside the data.
                archive.writestr(_entry_info("README.md", date_time), _README)
                _write_entry(
                    archive,
                    _entry_info("_tables/documents.jsonl", date_time),
                    _table_registry(cfg),
                    1 << 20,
                )
            for table in _tables_in(cfg):
                rows = _table_rows(cfg, table)
                if edge_cases:
                    rows = _with_edges(rows, _malformed_lines(table), edges.get(table, []))
                documents, bad = _write_entry(
                    archive,
                    _entry_info(f"{table}/documents.jsonl", date_time),
                    rows,
                    _estimated_bytes(cfg, table),
                )
                counts[table] = documents
                malformed[table] = bad
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return GeneratedExport(
        path=out, counts=counts, malformed=malformed, size_bytes=out.stat().st_size
    )


# --------------------------------------------------------------------------- fixtures


def write_fixture_zip(
    out: Path,
    tables: dict[str, list[dict[str, Any]]],
    *,
    date_time: tuple[int, int, int, int, int, int] = _FIXTURE_TIME,
) -> None:
    """Write fixture data the way the reference test helper does (reference §8).

    One entry `<table>/documents.jsonl` per table in the dict's order; rows joined with LF
    plus a trailing LF. The entry time is fixed, so fixtures are byte-identical.
    """
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for table, rows in tables.items():
            body = b"\n".join(orjson.dumps(row) for row in rows) + b"\n"
            archive.writestr(_entry_info(f"{table}/documents.jsonl", date_time), body)


def shared_dir() -> Path:
    """The reference folder: `$KHALA_SHARED_DIR`, else the copy of the reference's fixtures
    bundled in `producers/sample/reference/` (so a lone clone runs its tests; a unit test keeps
    it equal to `../shared` wherever that is beside the checkout)."""
    override = os.environ.get(_ENV_SHARED)
    if override:
        return Path(override)
    return _BUNDLED_REFERENCE


def load_reference_fixture(name: str) -> dict[str, list[dict[str, Any]]]:
    """Fixture data from `<shared>/reference/fixtures/<name>.json` (`a` means `fixture-a`)."""
    folder = shared_dir() / "reference" / "fixtures"
    file = folder / f"{name}.json"
    if not file.is_file() and not name.startswith("fixture-"):
        file = folder / f"fixture-{name}.json"
    data = orjson.loads(file.read_bytes())
    if not isinstance(data, dict) or not all(
        isinstance(rows, list) and all(isinstance(row, dict) for row in rows)
        for rows in data.values()
    ):
        raise ValueError(f"{file}: expected an object of table -> list of documents")
    return data
