"""Policy: Khala users → Laravel users (reference §4; SPEC §3.5, §3.10, §3.11, §8.5).

Candidates are resolved strictly in the reference's candidate order, so that email conflicts
are decided the same way whatever order the documents arrived in (SPEC §3.10).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from khala_stream.contract.changes import RowChange, SourceRef
from khala_stream.contract.codec import content_hash
from processors.fields import is_workos_id, now_timestamp, to_timestamp
from processors.lookups import ExistingUser, TargetView, UserIds
from processors.text import (
    gravatar_url,
    is_placeholder,
    is_valid_email,
    limit,
    normalise_email,
    placeholder_email,
)
from processors.workos import WorkosUser
from processors.workspace import Workspace

WorkosLookup = Callable[[Sequence[str]], Awaitable[dict[str, WorkosUser | None]]]
_CHUNK = 500


@dataclass(slots=True)
class Candidate:
    """A Khala identity to map onto a Laravel user, with what the export says about it."""

    workos_id: str
    email: str | None
    created_ms: int
    source: SourceRef


@dataclass(frozen=True, slots=True)
class ResolvedUser:
    """The Laravel user a candidate ends up as, after this run's changes."""

    id: int
    name: str
    email: str
    handle: str | None


@dataclass(slots=True)
class IdentityCounters:
    users_imported: int = 0
    users_resolved_via_workos: int = 0
    users_unresolved_placeholder: int = 0
    users_email_conflicts: int = 0


class _Emails:
    """Who holds which email: the database as it was, overlaid with this run's decisions.

    The database's answers are cached for one chunk of candidates; the emails this run gave
    out are kept in the derivation's workspace (they would grow with the export), and the
    few it took back from existing users (`_upgrade`) here.
    """

    def __init__(self, workspace: Workspace) -> None:
        self._workspace = workspace
        self.db: dict[str, str | None] = {}
        self.released: set[str] = set()
        self._reserved: dict[str, str] = {}
        self._new: dict[str, str] = {}

    def start_chunk(self) -> None:
        self.db.clear()
        self._reserved.clear()

    def known(self, email: str) -> bool:
        return email in self.db

    def learn(self, holders: dict[str, str | None]) -> None:
        """The database's holders of these emails, and this run's from earlier chunks."""
        self.db.update(holders)
        self._reserved.update(self._workspace.email_holders(holders))

    def reserve(self, email: str, workos_id: str) -> None:
        self._reserved[email] = workos_id
        self._new[email] = workos_id

    def end_chunk(self) -> None:
        self._workspace.reserve_emails(self._new.items())
        self._new.clear()

    def conflicts(self, email: str, workos_id: str) -> bool:
        in_run = self._reserved.get(email, workos_id) != workos_id
        holder = None if email in self.released else self.db.get(email)
        return in_run or (holder is not None and holder != workos_id)


class IdentityResolver:
    """Resolves candidates in order and emits the `users` row changes."""

    def __init__(
        self,
        *,
        run_id: int,
        view: TargetView,
        user_ids: UserIds,
        workos: WorkosLookup | None,
        workspace: Workspace,
    ) -> None:
        self._run_id = run_id
        self._view = view
        self._user_ids = user_ids
        self._workos = workos
        self._emails = _Emails(workspace)
        self.counters = IdentityCounters()

    async def resolve(
        self, candidates: Sequence[Candidate]
    ) -> tuple[dict[str, ResolvedUser], list[RowChange]]:
        """Resolves the next candidates in order (call again with the ones that follow)."""
        resolved: dict[str, ResolvedUser] = {}
        changes: list[RowChange] = []
        for start in range(0, len(candidates), _CHUNK):
            chunk = candidates[start : start + _CHUNK]
            self._emails.start_chunk()
            existing = await self._view.users_by_workos([c.workos_id for c in chunk])
            answers = await self._lookup_workos(chunk)
            await self._prefetch_emails(chunk, answers)
            new_ids = await self._user_ids.ids_for(
                [c.workos_id for c in chunk if c.workos_id not in existing]
            )
            for candidate in chunk:
                user, change = await self._resolve_one(
                    candidate,
                    answers.get(candidate.workos_id),
                    existing.get(candidate.workos_id),
                    new_ids.get(candidate.workos_id),
                )
                resolved[candidate.workos_id] = user
                if change is not None:
                    changes.append(change)
            self._emails.end_chunk()
        self.counters.users_imported += len(candidates)
        return resolved, changes

    async def _lookup_workos(self, chunk: Sequence[Candidate]) -> dict[str, WorkosUser | None]:
        if self._workos is None:
            return {}
        # The runbook's rule (SPEC §3.5): only user_* ids whose export email is blank or invalid.
        wanted = [
            c.workos_id
            for c in chunk
            if is_workos_id(c.workos_id)
            and not (c.email and is_valid_email(normalise_email(c.email)))
        ]
        return await self._workos(wanted) if wanted else {}

    async def _prefetch_emails(
        self, chunk: Sequence[Candidate], answers: dict[str, WorkosUser | None]
    ) -> None:
        wanted: set[str] = set()
        for c in chunk:
            answer = answers.get(c.workos_id)
            for email in (answer.email if answer else None, c.email):
                if email:
                    wanted.add(normalise_email(email))
            wanted.update(placeholder_email(c.workos_id, n) for n in range(3))
        await self._learn_holders(list(wanted))

    async def _learn_holders(self, emails: list[str]) -> None:
        unknown = [e for e in emails if not self._emails.known(e)]
        if not unknown:
            return
        owners = await self._view.email_owners(unknown)
        self._emails.learn({e: owners.get(e) for e in unknown})

    async def _unique(self, email: str, workos_id: str) -> str:
        """The reference's uniqueness loop (§4.4): fall back to numbered placeholders."""
        candidate, attempt = email, 0
        while True:
            await self._learn_holders([candidate])
            if not self._emails.conflicts(candidate, workos_id):
                break
            attempt += 1
            candidate = placeholder_email(workos_id, attempt)
        if attempt:
            self.counters.users_email_conflicts += 1
        self._emails.reserve(candidate, workos_id)
        return candidate

    async def _resolve_one(
        self,
        c: Candidate,
        answer: WorkosUser | None,
        existing: ExistingUser | None,
        new_id: int | None,
    ) -> tuple[ResolvedUser, RowChange | None]:
        workos_email = answer.email if answer else None
        if workos_email:
            self.counters.users_resolved_via_workos += 1
        export_email = normalise_email(c.email) if c.email else None
        preferred = workos_email or export_email
        if not (preferred and is_valid_email(preferred)):
            preferred = placeholder_email(c.workos_id)
        email = await self._unique(preferred, c.workos_id)
        export_valid = export_email is not None and is_valid_email(export_email)
        if is_placeholder(email) and not export_valid and not workos_email:
            self.counters.users_unresolved_placeholder += 1
        workos_name = answer.name if answer else None
        name = limit(workos_name or email.split("@", 1)[0] or c.workos_id, 80)
        avatar = (answer.avatar if answer else None) or gravatar_url(email)
        if existing is not None:
            return await self._upgrade(existing, email, name, workos_name, answer)
        assert new_id is not None
        created = to_timestamp(c.created_ms)
        values = {
            "id": new_id,
            "name": name,
            "email": email,
            "handle": None,
            "email_verified_at": None,
            "workos_id": c.workos_id,
            "remember_token": None,
            "avatar": avatar,
            "created_at": created,
            "updated_at": created,
        }
        change = RowChange(
            run_id=self._run_id,
            table="users",
            op="upsert",
            key=c.workos_id,
            values=values,
            row_hash=content_hash(values),
            source=c.source,
        )
        return ResolvedUser(new_id, name, email, None), change

    async def _upgrade(
        self,
        stored: ExistingUser,
        email: str,
        name: str,
        workos_name: str | None,
        answer: WorkosUser | None,
    ) -> tuple[ResolvedUser, RowChange | None]:
        """Reference §4.2 step 9: only empty, placeholder or Gravatar values are replaced."""
        updates: dict[str, object] = {}
        current = normalise_email(stored.email)
        new_email = stored.email
        if email != current and (
            (not is_valid_email(current) and is_valid_email(email))
            or (is_placeholder(current) and not is_placeholder(email))
        ):
            new_email = await self._unique(email, stored.workos_id)
            updates["email"] = new_email
            self._emails.released.add(current)
        local_part = new_email.split("@", 1)[0]
        if stored.name != name and (
            not stored.name
            or (
                workos_name
                and (
                    stored.name in (stored.workos_id, local_part)
                    or stored.name.startswith("migrated+")
                )
            )
        ):
            updates["name"] = name
        picture = answer.avatar if answer else None
        if (
            picture
            and picture != stored.avatar
            and (not stored.avatar or "gravatar.com/avatar" in stored.avatar)
        ):
            updates["avatar"] = picture
        user = ResolvedUser(
            stored.id, str(updates.get("name", stored.name)), new_email, stored.handle
        )
        if not updates:
            return user, None
        updates["updated_at"] = now_timestamp()
        change = RowChange(
            run_id=self._run_id, table="users", op="update", key=str(stored.id), values=updates
        )
        return user, change
