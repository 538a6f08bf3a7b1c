"""Configuration: flags, then environment, then defaults (SPEC §2). Built once, in the CLI.

Secrets (SASL password, WorkOS key, Khala deploy key) come only from the environment and
never print.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from khala_stream.errors import UsageError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
Compression = Literal["zstd", "lz4", "gzip", "snappy", "none"]
_COMPRESSIONS = ("zstd", "lz4", "gzip", "snappy", "none")
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///khala.sqlite"
DEFAULT_WORKOS_BASE_URL = "https://api.workos.com"
DEFAULT_L402_HOSTS = "sats4ai.com,l402.openagents.com"


class Secret:
    """A value that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSettings:
    bootstrap_servers: str | None = None
    """Brokers; None starts the embedded local broker (SPEC §7)."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None
    partitions: int = 6
    """Partitions of every topic this product creates (bounds the number of workers)."""
    trim_consumed: bool | None = None
    """Delete records the stages have applied to the database (DeleteRecords) as they go.
    None: only on the embedded broker, which holds every record in memory and snapshots all of
    it as a whole (bench/README.md); on a real cluster, retention is the operator's."""
    compression: Compression = "zstd"
    """Producer batch compression: zstd costs the producer about nothing and cuts what the
    broker stores and copies about eight-fold on export text (bench/README.md)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topic_prefix: str = "khala"
    database_url: str = DEFAULT_DATABASE_URL
    workos_api_key: Secret | None = None
    workos_base_url: str = DEFAULT_WORKOS_BASE_URL
    khala_deploy_key: Secret | None = None
    """The deploy key of the Khala deployment `follow` reads (KHALA_DEPLOY_KEY; never a flag)."""
    l402_allowlist_hosts: str = DEFAULT_L402_HOSTS
    broker_home: str = ".khala"
    """Where the embedded broker keeps its data, next to the default SQLite file."""
    broker_idle_s: float = 60.0
    """How long the embedded broker runs on once no command uses it (one that was killed)."""
    max_entry_bytes: int = 8 << 30
    """Largest uncompressed size of one export table (a larger one is refused as a bomb)."""
    max_ratio: float = 200.0
    """Largest uncompressed/compressed ratio of one export table above 64 MiB."""
    max_total_bytes: int = 32 << 30
    """Largest uncompressed size of the source tables together."""
    retry_deadline_s: float = 120.0
    """How long the stages wait for an unreachable database or broker before exit 1."""
    derive_lease_s: float = 30.0
    """How long a silent processor keeps its claim on a run before another may take over."""

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    for choice in allowed:  # any case; returned as spelled in `allowed`
        if value.upper() == choice.upper():
            return choice
    raise UsageError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Environment over defaults; the CLI applies its flags on top with `with_overrides`."""
    password = env.get("KAFKA_SASL_PASSWORD")
    protocol = _choice(env, "KAFKA_SECURITY_PROTOCOL", _PROTOCOLS) or "PLAINTEXT"
    mechanism = _choice(env, "KAFKA_SASL_MECHANISM", _MECHANISMS)
    if protocol.startswith("SASL") and mechanism is None:
        mechanism = "PLAIN"
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap_servers(
            env.get("KAFKA_BOOTSTRAP_SERVERS", ""), "KAFKA_BOOTSTRAP_SERVERS"
        ),
        security_protocol=protocol,  # type: ignore[arg-type]
        sasl_mechanism=mechanism,  # type: ignore[arg-type]
        sasl_username=env.get("KAFKA_SASL_USERNAME") or None,
        sasl_password=Secret(password) if password else None,
        ssl_cafile=env.get("KAFKA_SSL_CAFILE") or None,
        partitions=_positive(env, "KHALA_TOPIC_PARTITIONS", 6, MAX_PARTITIONS),
        compression=_choice(env, "KAFKA_COMPRESSION_TYPE", _COMPRESSIONS) or "zstd",  # type: ignore[arg-type]
        trim_consumed=_flag(env, "KHALA_TRIM_CONSUMED"),
    )
    if protocol.startswith("SASL") and not (kafka.sasl_username and kafka.sasl_password):
        raise UsageError(
            f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
        )
    if kafka.ssl_cafile is not None and not Path(kafka.ssl_cafile).is_file():
        raise UsageError(f"KAFKA_SSL_CAFILE: no such file: {kafka.ssl_cafile}")
    key = env.get("WORKOS_API_KEY", "").strip()
    deploy_key = env.get("KHALA_DEPLOY_KEY", "").strip()
    return Settings(
        kafka=kafka,
        topic_prefix=topic_prefix(env.get("KHALA_TOPIC_PREFIX") or "khala", "KHALA_TOPIC_PREFIX"),
        database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        workos_api_key=Secret(key) if key else None,
        workos_base_url=_http_url(env, "WORKOS_BASE_URL", DEFAULT_WORKOS_BASE_URL),
        khala_deploy_key=Secret(deploy_key) if deploy_key else None,
        l402_allowlist_hosts=env.get("L402_ALLOWLIST_HOSTS", DEFAULT_L402_HOSTS),
        broker_home=env.get("KHALA_BROKER_HOME") or ".khala",
        broker_idle_s=float(_positive(env, "KHALA_BROKER_IDLE_SECONDS", 60, _MAX_SECONDS)),
        derive_lease_s=float(_positive(env, "KHALA_DERIVE_LEASE_SECONDS", 30, _MAX_SECONDS)),
        retry_deadline_s=float(_positive(env, "KHALA_RETRY_DEADLINE_SECONDS", 120, _MAX_SECONDS)),
        max_entry_bytes=_positive(env, "KHALA_MAX_ENTRY_BYTES", 8 << 30, _MAX_BYTES),
        max_ratio=float(_positive(env, "KHALA_MAX_RATIO", 200, 1_000_000)),
        max_total_bytes=_positive(env, "KHALA_MAX_TOTAL_BYTES", 32 << 30, _MAX_BYTES),
    )


# Kafka's topic name rule; the longest name made from the prefix adds 13 (".dead-letters") to it
# and Kafka allows 249.
_TOPIC_PREFIX: Final = re.compile(r"[A-Za-z0-9._-]{1,200}")


def topic_prefix(value: str, name: str) -> str:
    """`value` if Kafka takes it in a topic name, else UsageError naming `name`."""
    if not _TOPIC_PREFIX.fullmatch(value):
        raise UsageError(
            f"{name} may hold only letters, digits, '.', '_' and '-', at most 200 of them"
        )
    return value


PORTS: Final = range(1, 65536)


def bootstrap_servers(raw: str, name: str) -> str | None:
    """`host[:port]` items separated by commas, or None when unset; UsageError naming `name`."""
    if not raw.strip():
        return None
    for item in (item.strip() for item in raw.split(",")):
        port = item.rpartition(":")[2] if ":" in item and not item.endswith("]") else "1"
        if not item or not (port.isascii() and port.isdigit() and int(port) in PORTS):
            raise UsageError(
                f"{name} must be host:port items separated by commas, ports 1 to 65535"
            )
    return raw


def is_http_url(raw: str) -> bool:
    """An http:// or https:// URL with a host, and a port from 1 to 65535 if it names one."""
    try:
        parts = urlsplit(raw)
        port = parts.port  # not a number, or past 65535: ValueError
    except ValueError:  # that, or an unclosed IPv6 bracket
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _http_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not is_http_url(raw):  # the value is not repeated: a URL may hold a password
        raise UsageError(f"{name} must be an http:// or https:// URL")
    return raw


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise UsageError(f"{name} must be 1 or 0, not {raw!r}")
    return raw in ("1", "true", "yes")


MAX_PARTITIONS: Final = 256
"""Partitions per topic at most: each is a unit of parallelism, and the stages run a handful of
workers; the embedded broker stalls creating many thousands."""
_MAX_SECONDS: Final = 1_000_000  # beyond that, a float of seconds no longer makes a sane wait
_MAX_BYTES: Final = 1 << 50


def _positive(env: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    # isdigit alone takes "²" too, which int() refuses; a 5,000-digit number int() refuses too.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or not 1 <= int(raw) <= maximum:
        raise UsageError(f"{name} must be a whole number from 1 to {maximum:,}, not {raw[:40]!r}")
    return int(raw)
