"""The one exception tree of khala-stream.

    KhalaError                      exit 1 unless a subclass says otherwise
    ├── UsageError                  exit 2: bad flags or configuration
    │   ├── WorkosKeyError          exit 2: WORKOS_API_KEY missing or refused before any write
    │   └── DeployKeyError          exit 2: KHALA_DEPLOY_KEY missing or refused by the deployment
    ├── InvalidExportError          exit 2: missing path, not a ZIP/folder, corrupt, no chat tables
    └── RuntimeFailure              exit 1: broker or database unreachable after retries
        ├── TransientError          worth retrying with backoff (connection lost, 429/5xx ...)
        ├── UnknownRecordVersion    a stored record written by a newer khala-stream
        ├── SourceAnswerError       a live deployment answered outside its documented shape
        ├── SourceUnreachable       a live deployment failing (429/5xx/transport) past the deadline
        └── WorkosAuthError         a 401 from WorkOS in mid-run: stop, resumable

Every class builds its message from the attributes it stores, and declares its CLI exit code.
Adapters translate library errors into this tree at one boundary each, chaining with `from`.
"""

from __future__ import annotations

from pathlib import Path


class KhalaError(Exception):
    """Root of every error khala-stream raises on purpose."""

    exit_code = 1


class UsageError(KhalaError):
    """Bad flags or configuration; nothing has been written."""

    exit_code = 2


class WorkosKeyError(UsageError):
    """`--resolve-workos-users` cannot run: the key is missing or refused."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"WorkOS: {reason}")


class DeployKeyError(UsageError):
    """`follow` cannot read the deployment: KHALA_DEPLOY_KEY is missing or refused (401/403).
    Raised before anything is written; the key never shows in the message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Khala deployment: {reason}")


class InvalidExportError(KhalaError):
    """The source cannot be imported at all; nothing has been written."""

    exit_code = 2

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class RuntimeFailure(KhalaError):
    """The import could not finish: a dependency failed after retries."""

    exit_code = 1


class WorkosUnreachable(RuntimeFailure):
    """WorkOS could not be asked whether it takes the key (unreachable, or failing after
    retries): a run-time failure (exit 1), not a refused key."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"WorkOS: {reason}")


class TransientError(RuntimeFailure):
    """A failure that may pass: retry with capped exponential backoff."""


class WorkosAuthError(RuntimeFailure):
    """WorkOS refused the key in the middle of a run; the run can be resumed."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"WorkOS refused the API key (HTTP {status}); fix it and rerun")


class UnknownRecordVersion(RuntimeFailure):
    """A stored record has a version this khala-stream cannot read (written by a newer one)."""

    def __init__(self, what: str, version: object, known: int) -> None:
        self.what = what
        self.version = version
        self.known = known
        super().__init__(
            f"{what} has version {version!r}, and this khala-stream reads versions up to"
            f" {known}: it was written by a newer khala-stream; use that one (or a newer one)"
        )


class SourceAnswerError(RuntimeFailure):
    """A live deployment's answer is not the documented shape of its endpoint."""

    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"Khala deployment: GET {endpoint} answered {reason}")


class SourceUnreachable(RuntimeFailure):
    """A live deployment kept failing (throttled, 5xx, unreachable) past the retry deadline."""

    def __init__(self, endpoint: str, reason: str, waited_s: float) -> None:
        self.endpoint = endpoint
        self.reason = reason
        self.waited_s = waited_s
        super().__init__(
            f"Khala deployment: GET {endpoint} still failing after {waited_s:.0f} s: {reason}"
        )
