"""Issue #6, part 4: secured Kafka (SPEC §2). The security settings come from the environment
only, reach every client the product creates (producer, consumers, admin), and never show the
password.

Configuration objects are checked here for every protocol and mechanism; the real aiokafka
objects are built (never started) and inspected. Against the broker: the embedded noida-db
speaks SASL/PLAIN (any credentials) but neither SCRAM nor TLS, so an end-to-end import runs
over SASL_PLAINTEXT with PLAIN, and every Kafka client created by every process of it is
recorded (through a `sitecustomize` on PYTHONPATH) and checked.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from khala_stream.broker.clients import connection_kwargs, make_admin, make_consumer, make_producer
from khala_stream.config import Secret, settings_from_env
from khala_stream.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = "127.0.0.1:9"  # nothing is ever connected to in the unit tests
PASSWORD = "pw-" + "9d2f7c1e" * 4
USERNAME = "khala-importer"
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CA_NAME = "khala-stream test CA"


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A throwaway self-signed CA certificate (openssl), valid for a day."""
    folder = tmp_path_factory.mktemp("ca")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(folder / "ca.key"),
            "-out",
            str(folder / "ca.pem"),
            "-days",
            "1",
            "-subj",
            f"/CN={CA_NAME}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(folder / "ca.pem")


def env_for(protocol: str | None, mechanism: str | None, ca: str | None) -> dict[str, str]:
    env = {"KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP}
    if protocol is not None:
        env["KAFKA_SECURITY_PROTOCOL"] = protocol
    if mechanism is not None:
        env["KAFKA_SASL_MECHANISM"] = mechanism
    if protocol is not None and protocol.upper().startswith("SASL"):
        env |= {"KAFKA_SASL_USERNAME": USERNAME, "KAFKA_SASL_PASSWORD": PASSWORD}
    if ca is not None:
        env["KAFKA_SSL_CAFILE"] = ca
    return env


def combinations() -> Iterator[Any]:
    yield pytest.param("PLAINTEXT", None, id="PLAINTEXT")
    yield pytest.param(None, None, id="default")
    yield pytest.param("SSL", None, id="SSL")
    for protocol in SASL_PROTOCOLS:
        yield pytest.param(protocol, None, id=f"{protocol}-default-mechanism")
        for mechanism in MECHANISMS:
            yield pytest.param(protocol, mechanism, id=f"{protocol}-{mechanism}")
    yield pytest.param("sasl_ssl", "scram-sha-512", id="lower-case")


def expected_kwargs(protocol: str | None, mechanism: str | None) -> dict[str, Any]:
    protocol = (protocol or "PLAINTEXT").upper()
    expected: dict[str, Any] = {"bootstrap_servers": BOOTSTRAP, "security_protocol": protocol}
    if protocol.startswith("SASL"):
        expected |= {
            "sasl_mechanism": (mechanism or "PLAIN").upper(),
            "sasl_plain_username": USERNAME,
            "sasl_plain_password": PASSWORD,
        }
    return expected


def check_ssl_context(context: Any, with_ca: bool) -> None:
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    if with_ca:
        certs: list[Any] = context.get_ca_certs()
        subjects = [dict(rdn[0] for rdn in cert["subject"]) for cert in certs]
        assert {"commonName": CA_NAME} in subjects


@pytest.mark.parametrize(("protocol", "mechanism"), list(combinations()))
@pytest.mark.parametrize("with_ca", [True, False], ids=["cafile", "system-ca"])
def test_settings_reach_every_client(
    protocol: str | None, mechanism: str | None, with_ca: bool, ca_file: str
) -> None:
    uses_tls = (protocol or "").upper() in ("SSL", "SASL_SSL")
    if with_ca and not uses_tls:
        env = env_for(protocol, mechanism, ca_file)  # a CA file is ignored without TLS
    else:
        env = env_for(protocol, mechanism, ca_file if with_ca else None)
    settings = settings_from_env(env)
    kafka = settings.kafka
    expected = expected_kwargs(protocol, mechanism)
    assert kafka.security_protocol == expected["security_protocol"]
    assert kafka.sasl_mechanism == expected.get("sasl_mechanism")
    assert kafka.sasl_username == expected.get("sasl_plain_username")
    assert kafka.sasl_password == (Secret(PASSWORD) if "sasl_plain_password" in expected else None)

    kwargs = connection_kwargs(kafka)
    context = kwargs.pop("ssl_context", None)
    assert kwargs == expected
    assert (context is not None) == uses_tls
    if uses_tls:
        check_ssl_context(context, with_ca)

    async def build() -> list[Any]:
        producer = make_producer(kafka)
        consumer = make_consumer(kafka, "t.users", group_id="t.process")
        reader = make_consumer(kafka, group_id=None)
        admin = make_admin(kafka)
        clients = [producer.client, consumer._client, reader._client, admin._client]
        await producer.stop()
        await consumer.stop()
        await reader.stop()
        await admin.close()
        return clients

    for client in asyncio.run(build()):
        assert client._bootstrap_servers == BOOTSTRAP
        assert client._security_protocol == expected["security_protocol"]
        if "sasl_mechanism" in expected:
            assert client._sasl_mechanism == expected["sasl_mechanism"]
            assert client._sasl_plain_username == USERNAME
            assert client._sasl_plain_password == PASSWORD
        else:
            assert client._sasl_plain_password is None
        if uses_tls:
            check_ssl_context(client._ssl_context, with_ca)
        else:
            assert client._ssl_context is None


@pytest.mark.parametrize(
    ("value", "codec"), [(None, "zstd"), ("zstd", "zstd"), ("gzip", "gzip"), ("none", None)]
)
def test_producers_compress_as_configured(value: str | None, codec: str | None) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP} | (
        {"KAFKA_COMPRESSION_TYPE": value} if value else {}
    )
    kafka = settings_from_env(env).kafka

    async def build() -> Any:
        producer = make_producer(kafka)
        accumulator = producer._message_accumulator
        await producer.stop()
        return accumulator

    codes = {None: 0, "gzip": 1, "zstd": 4}
    assert asyncio.run(build())._compression_type == codes[codec]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KAFKA_COMPRESSION_TYPE", "brotli"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL"),
        ("KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-1"),
        ("KAFKA_SASL_MECHANISM", "OAUTHBEARER"),
    ],
)
def test_an_unknown_protocol_or_mechanism_is_a_usage_error(variable: str, value: str) -> None:
    env = env_for("SASL_SSL", "PLAIN", None) | {variable: value}
    with pytest.raises(UsageError) as caught:
        settings_from_env(env)
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith(f"{variable} must be one of ")
    assert repr(value) in str(caught.value)


def test_the_cli_refuses_an_unknown_protocol_with_exit_2_before_any_write(tmp_path: Path) -> None:
    db = tmp_path / "khala.sqlite"
    result = run_cli(
        ["import-chat"],
        {
            "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "KAFKA_SECURITY_PROTOCOL": "TLS",
            "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "khala-stream: error: KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, "
        "SASL_PLAINTEXT, SASL_SSL, not 'TLS'\n"
    )
    assert not db.exists()


def test_the_password_never_shows() -> None:
    settings = settings_from_env(
        env_for("SASL_SSL", "SCRAM-SHA-512", None) | {"WORKOS_API_KEY": "sk_test_hidden_key"}
    )
    for text in (repr(settings), str(settings), repr(settings.kafka), f"{settings.kafka}"):
        assert PASSWORD not in text and "sk_test_hidden_key" not in text
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.reveal() == PASSWORD
    assert repr(settings.kafka.sasl_password) == "Secret('**********')"


def run_cli(
    args: list[str], env: dict[str, str], *, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "WORKOS_", "KHALA_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "khala_app", *args],
        env=base | env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_sasl_without_credentials_is_a_usage_error(tmp_path: Path) -> None:
    db = tmp_path / "khala.sqlite"
    result = run_cli(
        ["import-chat", "--retry-deadline", "2"],
        {
            "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "KAFKA_SASL_USERNAME" in result.stderr
    assert not db.exists()


def test_a_missing_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    db = tmp_path / "khala.sqlite"
    result = run_cli(
        ["import-chat", "--retry-deadline", "2"],
        {
            "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": str(tmp_path / "no-such-ca.pem"),
            "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "KAFKA_SSL_CAFILE" in result.stderr and "waiting for the broker" not in result.stderr
    assert not db.exists()


# --------------------------------------------------------------------------- one door to Kafka

CLIENT_CLASSES = {
    "AIOKafkaProducer",
    "AIOKafkaConsumer",
    "AIOKafkaAdminClient",
    "AIOKafkaClient",
    "KafkaProducer",
    "KafkaConsumer",
    "KafkaAdminClient",
    "Producer",
    "Consumer",
    "AdminClient",
    "App",  # faust.App would open its own clients
}
FACTORY_MODULE = REPO / "khala_stream" / "broker" / "clients.py"


def test_every_kafka_client_is_built_by_the_factories() -> None:
    """No product module constructs a Kafka client except broker/clients.py, so the security
    settings cannot be forgotten anywhere."""
    found: list[str] = []
    for package in ("khala_app", "khala_stream", "producers", "processors", "sinks"):
        for file in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(file.read_text(), filename=str(file))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name in CLIENT_CLASSES and file != FACTORY_MODULE:
                    found.append(f"{file.relative_to(REPO)}:{node.lineno}: {name}(...)")
    assert found == []
    factories = ast.parse(FACTORY_MODULE.read_text())
    built = {
        node.func.id
        for node in ast.walk(factories)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"} <= built


# --------------------------------------------------------------------------- against the broker

RECORDER = """
import json, os
import aiokafka, aiokafka.admin

_LOG = os.environ["KHALA_TEST_CLIENT_LOG"]


def _wrap(cls):
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        with open(_LOG, "a") as log:
            log.write(json.dumps({
                "pid": os.getpid(),
                "class": cls.__name__,
                "security_protocol": kwargs.get("security_protocol", "PLAINTEXT"),
                "sasl_mechanism": kwargs.get("sasl_mechanism"),
                "sasl_plain_username": kwargs.get("sasl_plain_username"),
                "has_password": bool(kwargs.get("sasl_plain_password")),
            }) + "\\n")
        original(self, *args, **kwargs)

    cls.__init__ = __init__


_wrap(aiokafka.AIOKafkaProducer)
_wrap(aiokafka.AIOKafkaConsumer)
_wrap(aiokafka.admin.AIOKafkaAdminClient)
"""


@pytest.mark.kafka
def test_sasl_plain_reaches_every_client_of_every_process(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    from producers.generator import load_reference_fixture, write_fixture_zip

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORDER)
    log = tmp_path / "clients.jsonl"
    export = tmp_path / "fixture-a.zip"
    write_fixture_zip(export, load_reference_fixture("fixture-a"))
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": USERNAME,
        "KAFKA_SASL_PASSWORD": PASSWORD,
        "KHALA_TOPIC_PREFIX": f"t_{uuid.uuid4().hex[:8]}",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/khala.sqlite",
        "PYTHONPATH": str(hook),
        "KHALA_TEST_CLIENT_LOG": str(log),
    }
    outputs = []
    for args in (["import-chat", str(export)], ["dlq", "list"], ["lag"], ["counts"]):
        done = run_cli(args, env, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        outputs.append(done.stdout + done.stderr)
    assert "Import completed successfully." in outputs[0]
    assert all(PASSWORD not in text for text in outputs)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["class"] for r in records} == {
        "AIOKafkaProducer",
        "AIOKafkaConsumer",
        "AIOKafkaAdminClient",
    }
    assert len({r["pid"] for r in records}) >= 2  # import-chat (and its stages), dlq, lag
    for record in records:
        assert record["security_protocol"] == "SASL_PLAINTEXT", record
        assert record["sasl_mechanism"] == "PLAIN", record
        assert record["sasl_plain_username"] == USERNAME, record
        assert record["has_password"], record


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SASL_PLAINTEXT", "SCRAM-SHA-512"), ("SSL", None)],
)
def test_a_security_mismatch_with_the_broker_fails_within_the_deadline(
    protocol: str, mechanism: str | None, tmp_path: Path, kafka_bootstrap: str
) -> None:
    """noida-db offers SASL/PLAIN only and no TLS: the import cannot connect, and stops."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_SECURITY_PROTOCOL": protocol,
        "KAFKA_SASL_USERNAME": USERNAME,
        "KAFKA_SASL_PASSWORD": PASSWORD,
        "KHALA_TOPIC_PREFIX": f"t_{uuid.uuid4().hex[:8]}",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/khala.sqlite",
    }
    if mechanism:
        env["KAFKA_SASL_MECHANISM"] = mechanism
    done = run_cli(["import-chat", "--retry-deadline", "3"], env, cwd=tmp_path, timeout=90)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "khala-stream: error: gave up waiting for the broker after" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
