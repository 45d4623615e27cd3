"""Configuration of the custodian's command line: a small TOML file plus environment overrides.

What this module does: turn the parsed TOML document and the process environment into one
validated :class:`CustodianConfig`, or raise :class:`InvalidConfiguration` naming the file, the
key and what is wrong. The parsing functions are pure (they take mappings); only
:func:`load_config` reads a file.

The file (every key optional; the defaults are shown)::

    [custodian]
    id = "custodian-bank"
    database_url = "sqlite:///var/custodian.sqlite3"
    salt_secret_file = "..."          # the attestation service's salt secret (for show-proof)

    [assets]                          # asset code = decimals of its minor unit
    BENJI = 6
    USDC = 6
    BTC = 8
    ETH = 18

    [kafka]                           # any MCB_KAFKA_<NAME> setting, as lower-case <name>
    bootstrap_servers = "127.0.0.1:9092"

    [serve]                           # ``mcb custodian serve`` only
    exchange = "exchange-one"         # required by serve: the stream's exchange
    translog_path = "var/translog.sqlite3"
    host = "127.0.0.1"
    port = 8080                       # 0 picks a free port (the bound address is printed)
    token_file = "..."                # required by serve: "<sha256 hex> <principal>" lines
    price_file = "..."                # required by serve: a JSON price document
    cosigner_seeds_file = "..."       # DEVELOPMENT ONLY: one hex seed per line, in-process
    exchange_registry_file = "..."    # exchange key registry: verifies release acknowledgements
    quorum = 2
    interval_s = 60.0
    debounce_s = 0.05

    [hsm]                             # the custodian key on a PKCS#11 token (SoftHSM2)
    library_path = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "..."
    key_label = "attestation"
    pin_file = "..."                  # or the PIN in $MCB_HSM_PIN; never on the command line

    [exchange]                        # ``mcb exchange ...`` only
    id = "exchange-one"               # required by serve: this exchange's party id
    database_url = "sqlite:///var/exchange.sqlite3"
    host = "127.0.0.1"
    port = 8090                       # 0 picks a free port (the bound address is printed)
    url = "http://127.0.0.1:8090"     # where the operator commands reach the API (default:
                                      # from host and port)
    token_file = "..."                # required by serve: "<sha256 hex> <principal>" lines
    evaluate_interval_s = 5.0         # margin deadlines and staleness, re-evaluated this often

    [exchange.custodians.custodian-bank]   # one table per custodian taken statements from
    registry_file = "..."             # the key registry JSON that custodian publishes

    [exchange.policy]                 # overrides of the default collateral policy
    quote = "USD"
    quote_decimals = 2
    leverage_bps = 20000
    margin_call_bps = 10000
    liquidation_bps = 8000
    margin_call_deadline_s = 14400
    stale_after_s = 180
    zero_grace_s = 900

    [exchange.policy.rates_bps]       # entries replace the default rate of that asset
    BTC = 8000

    [exchange.hsm]                    # the exchange's notice key; keys as in [hsm]
    token_label = "..."

Environment overrides (they win over the file): ``MCB_DATABASE_URL``, ``MCB_SALT_SECRET_FILE``,
``MCB_HSM_PIN`` (the token PIN, which the file can only name by path) and every ``MCB_KAFKA_*``
name of :func:`bridge.kafka.settings_from_env`, which validates the Kafka settings. For the
exchange: ``MCB_EXCHANGE_DATABASE_URL``, ``MCB_EXCHANGE_URL`` and ``MCB_EXCHANGE_HSM_PIN``
(``MCB_EXCHANGE_TOKEN``, the operator's bearer token, is read by the command line only).
``MCB_CONFIG`` names the file when ``--config`` is not given.

What it does not do: open the database, read the salt secret, the PIN or a key registry, or
connect to Kafka.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from attestations.amounts import Asset
from attestations.errors import BridgeError, ConfigurationError
from attestations.statement import validate_party
from bridge.kafka import ENV_PREFIX as KAFKA_ENV_PREFIX
from bridge.kafka import KafkaSettings, settings_from_env
from custodian.service import DEFAULT_DEBOUNCE_S, DEFAULT_INTERVAL_S
from exchange.errors import InvalidPolicy
from exchange.policy import CollateralPolicy

ENV_CONFIG: Final = "MCB_CONFIG"
ENV_DATABASE_URL: Final = "MCB_DATABASE_URL"
ENV_SALT_SECRET_FILE: Final = "MCB_SALT_SECRET_FILE"  # noqa: S105 (a variable name, no secret)
ENV_HSM_PIN: Final = "MCB_HSM_PIN"
ENV_EXCHANGE_DATABASE_URL: Final = "MCB_EXCHANGE_DATABASE_URL"
ENV_EXCHANGE_URL: Final = "MCB_EXCHANGE_URL"
ENV_EXCHANGE_HSM_PIN: Final = "MCB_EXCHANGE_HSM_PIN"
ENV_EXCHANGE_TOKEN: Final = "MCB_EXCHANGE_TOKEN"  # noqa: S105 (a variable name, no secret)
DEFAULT_EXCHANGE_DATABASE_URL: Final = "sqlite:///var/exchange.sqlite3"
DEFAULT_EXCHANGE_PORT: Final = 8090
DEFAULT_EVALUATE_INTERVAL_S: Final = 5.0
DEFAULT_TRANSLOG_PATH: Final = "var/translog.sqlite3"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
DEFAULT_HSM_KEY_LABEL: Final = "attestation"
DEFAULT_CUSTODIAN: Final = "custodian-bank"
DEFAULT_DATABASE_URL: Final = "sqlite:///var/custodian.sqlite3"
DEFAULT_ASSETS: Final = (Asset("BENJI", 6), Asset("USDC", 6), Asset("BTC", 8), Asset("ETH", 18))
SUPPORTED_BACKENDS: Final = frozenset({"sqlite", "postgresql"})

_SECTIONS: Final = frozenset({"custodian", "assets", "kafka", "serve", "hsm", "exchange"})
_CUSTODIAN_KEYS: Final = frozenset({"id", "database_url", "salt_secret_file"})
_SERVE_STRINGS: Final = frozenset(
    {
        "exchange",
        "translog_path",
        "host",
        "token_file",
        "price_file",
        "cosigner_seeds_file",
        "exchange_registry_file",
    }
)
_SERVE_NUMBERS: Final = frozenset({"port", "quorum", "interval_s", "debounce_s"})
_HSM_KEYS: Final = frozenset({"library_path", "token_label", "key_label", "pin_file"})
_EXCHANGE_STRINGS: Final = frozenset({"id", "database_url", "host", "url", "token_file"})
_EXCHANGE_TABLES: Final = frozenset({"custodians", "policy", "hsm"})
_EXCHANGE_KEYS: Final = _EXCHANGE_STRINGS | _EXCHANGE_TABLES | {"port", "evaluate_interval_s"}
_POLICY_INTS: Final = frozenset(
    {"quote_decimals", "leverage_bps", "margin_call_bps", "liquidation_bps"}
)
_POLICY_SECONDS: Final = {
    "margin_call_deadline_s": "margin_call_deadline",
    "stale_after_s": "stale_after",
    "zero_grace_s": "zero_grace",
}
_POLICY_KEYS: Final = _POLICY_INTS | set(_POLICY_SECONDS) | {"quote", "rates_bps"}


class InvalidConfiguration(ConfigurationError):
    """The configuration file or an environment override is malformed or inconsistent."""

    reason = "invalid_configuration"


@dataclass(frozen=True, slots=True)
class HsmConfig:
    """Where the custodian key lives: a PKCS#11 token. The PIN itself is never part of the
    configuration: ``pin_file`` names a file, else ``$MCB_HSM_PIN`` is read when the token is
    opened."""

    token_label: str
    library_path: str | None = None
    key_label: str = DEFAULT_HSM_KEY_LABEL
    pin_file: str | None = None


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """What ``mcb custodian serve`` needs beyond the book. ``exchange``, ``token_file`` and
    ``price_file`` are required by serve (checked by :meth:`require`), not by the book
    commands."""

    exchange: str | None = None
    translog_path: str = DEFAULT_TRANSLOG_PATH
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token_file: str | None = None
    price_file: str | None = None
    cosigner_seeds_file: str | None = None
    exchange_registry_file: str | None = None
    """The exchange's key registry (JSON): release acknowledgements arriving on the instructions
    topic are verified under it and kept for unpledges; without it they are dead-lettered."""
    quorum: int = 2
    interval_s: float = DEFAULT_INTERVAL_S
    debounce_s: float = DEFAULT_DEBOUNCE_S

    def __post_init__(self) -> None:
        if self.exchange is not None:
            try:
                validate_party(self.exchange, what="exchange")
            except BridgeError as exc:
                raise InvalidConfiguration(f"[serve] exchange: {exc}") from exc
        if not 0 <= self.port < 65536:
            raise InvalidConfiguration(f"[serve] port must be in 0..65535, not {self.port}")
        if self.quorum < 1:
            raise InvalidConfiguration("[serve] quorum must be at least 1")
        if not self.interval_s > 0 or self.debounce_s < 0:
            raise InvalidConfiguration("[serve] interval_s must be positive, debounce_s >= 0")

    def require(self, name: str) -> str:
        """The string setting ``name``, or :class:`InvalidConfiguration` naming it."""
        value = getattr(self, name)
        if not isinstance(value, str):
            raise InvalidConfiguration(f"serve needs {name} in [serve]")
        return value


@dataclass(frozen=True, slots=True)
class CustodianSource:
    """A custodian the exchange takes statements from, and the file of the key registry that
    custodian publishes (its HSM key, its co-signers and their quorum)."""

    id: str
    registry_file: str


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    """What ``mcb exchange`` needs. ``id``, ``token_file`` and at least one custodian are
    required by serve (:meth:`require`), not by the operator commands, which only need
    :attr:`api_url`."""

    id: str | None = None
    database_url: str = DEFAULT_EXCHANGE_DATABASE_URL
    host: str = DEFAULT_HOST
    port: int = DEFAULT_EXCHANGE_PORT
    url: str | None = None
    token_file: str | None = None
    evaluate_interval_s: float = DEFAULT_EVALUATE_INTERVAL_S
    custodians: tuple[CustodianSource, ...] = ()
    policy: CollateralPolicy = field(default_factory=CollateralPolicy.default)
    hsm: HsmConfig | None = None

    def __post_init__(self) -> None:
        if self.id is not None:
            try:
                validate_party(self.id, what="exchange")
            except BridgeError as exc:
                raise InvalidConfiguration(f"[exchange] id: {exc}") from exc
        check_database_url(self.database_url, where="[exchange] database_url")
        if not 0 <= self.port < 65536:
            raise InvalidConfiguration(f"[exchange] port must be in 0..65535, not {self.port}")
        if not self.evaluate_interval_s > 0:
            raise InvalidConfiguration("[exchange] evaluate_interval_s must be positive")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise InvalidConfiguration("[exchange] url must start with http:// or https://")

    @property
    def api_url(self) -> str:
        """Where the operator commands reach the API: ``url``, else ``http://host:port``."""
        if self.url is not None:
            return self.url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

    def require(self, name: str) -> str:
        value = getattr(self, name)
        if not isinstance(value, str):
            raise InvalidConfiguration(f"exchange serve needs {name} in [exchange]")
        return value


@dataclass(frozen=True, slots=True)
class CustodianConfig:
    """What the ``mcb custodian`` commands need. ``kafka`` is None when no bootstrap server is
    configured (the book commands do not need one)."""

    custodian: str = DEFAULT_CUSTODIAN
    database_url: str = DEFAULT_DATABASE_URL
    assets: tuple[Asset, ...] = DEFAULT_ASSETS
    salt_secret_file: str | None = None
    kafka: KafkaSettings | None = None
    serve: ServeConfig = ServeConfig()
    hsm: HsmConfig | None = None
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)

    def __post_init__(self) -> None:
        check_database_url(self.database_url)
        if not self.assets:
            raise InvalidConfiguration("at least one asset must be configured")


def check_database_url(url: object, *, where: str = "database_url") -> str:
    """A SQLAlchemy URL of SQLite or PostgreSQL (any driver); anything else is refused here, with
    the offending scheme, rather than when the first command runs."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidConfiguration(f"{where} must be a non-empty string")
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidConfiguration(f"{where} {url[:80]!r} is not a database URL") from exc
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise InvalidConfiguration(
            f"{where} scheme {parsed.drivername!r} is not supported: use sqlite:///path or "
            "postgresql+psycopg://..."
        )
    return url


def parse_toml(text: str, *, source: str) -> dict[str, Any]:
    """The TOML document ``text`` (read from ``source``, named in errors)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfiguration(f"{source}: not valid TOML: {exc}") from exc


def _table(document: Mapping[str, Any], name: str, *, source: str) -> Mapping[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, Mapping):
        raise InvalidConfiguration(f"{source}: [{name}] must be a table")
    return table


def parse_assets(table: Mapping[str, Any], *, source: str) -> tuple[Asset, ...]:
    """``CODE = decimals`` entries, in file order."""
    assets = []
    for code, decimals in table.items():
        if isinstance(decimals, bool) or not isinstance(decimals, int):
            raise InvalidConfiguration(
                f"{source}: [assets] {code} must be an integer number of decimals"
            )
        try:
            assets.append(Asset(code, decimals))
        except BridgeError as exc:
            raise InvalidConfiguration(f"{source}: [assets] {code}: {exc}") from exc
    return tuple(assets)


def _kafka_env(table: Mapping[str, Any], *, source: str) -> dict[str, str]:
    """The file's [kafka] table as ``MCB_KAFKA_<NAME>`` strings, so one parser
    (:func:`settings_from_env`) validates both the file and the environment."""
    env: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | str):
            text = str(value)
        else:
            raise InvalidConfiguration(f"{source}: [kafka] {key} must be a string or integer")
        env[KAFKA_ENV_PREFIX + key.upper()] = text
    return env


def _check_keys(table: Mapping[str, Any], known: frozenset[str], *, name: str, source: str) -> None:
    if unknown := sorted(set(table) - known):
        raise InvalidConfiguration(
            f"{source}: unknown key(s) in [{name}]: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )


def parse_serve(table: Mapping[str, Any], *, source: str) -> ServeConfig:
    """The [serve] table: paths and names are strings, ``port`` and ``quorum`` integers,
    ``interval_s`` and ``debounce_s`` numbers of seconds."""
    _check_keys(table, _SERVE_STRINGS | _SERVE_NUMBERS, name="serve", source=source)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _SERVE_STRINGS:
            if not isinstance(value, str) or not value.strip():
                raise InvalidConfiguration(f"{source}: [serve] {key} must be a non-empty string")
            values[key] = value
        elif key in ("port", "quorum"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfiguration(f"{source}: [serve] {key} must be an integer")
            values[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidConfiguration(f"{source}: [serve] {key} must be a number of seconds")
            values[key] = float(value)
    try:
        return ServeConfig(**values)
    except InvalidConfiguration as exc:
        raise InvalidConfiguration(f"{source}: {exc}") from exc


def parse_hsm(
    table: Mapping[str, Any], *, source: str, name: str = "hsm", pin_env: str = ENV_HSM_PIN
) -> HsmConfig | None:
    """The [hsm] table (or [exchange.hsm]: ``name``; None when absent). A ``pin`` key is
    refused: the PIN goes in a file or in ``$pin_env``, never in the configuration."""
    if not table:
        return None
    if "pin" in table:
        raise InvalidConfiguration(
            f"{source}: [{name}] pin is not accepted: put the PIN in a file named by pin_file, "
            f"or in ${pin_env}"
        )
    _check_keys(table, _HSM_KEYS, name=name, source=source)
    for key, value in table.items():
        if not isinstance(value, str) or not value.strip():
            raise InvalidConfiguration(f"{source}: [{name}] {key} must be a non-empty string")
    if "token_label" not in table:
        raise InvalidConfiguration(f"{source}: [{name}] token_label is required")
    return HsmConfig(
        token_label=table["token_label"],
        library_path=table.get("library_path"),
        key_label=table.get("key_label", DEFAULT_HSM_KEY_LABEL),
        pin_file=table.get("pin_file"),
    )


def parse_policy(table: Mapping[str, Any], *, source: str) -> CollateralPolicy:
    """[exchange.policy]: overrides of :meth:`CollateralPolicy.default`. Durations are whole
    seconds (``*_s``); ``rates_bps`` entries replace the default rate of the assets they name
    (0: not collateral). The policy checks its own consistency (a liquidation line below the
    margin-call level, rates within 0..10,000 bp)."""
    _check_keys(table, frozenset(_POLICY_KEYS), name="exchange.policy", source=source)
    overrides: dict[str, Any] = {}
    for key, value in table.items():
        if key == "quote":
            if not isinstance(value, str):
                raise InvalidConfiguration(f"{source}: [exchange.policy] quote must be a string")
            overrides["quote"] = value
        elif key == "rates_bps":
            if not isinstance(value, Mapping):
                raise InvalidConfiguration(f"{source}: [exchange.policy.rates_bps] must be a table")
            rates = dict(CollateralPolicy.default().rates_bps)
            for asset, rate in value.items():
                if isinstance(rate, bool) or not isinstance(rate, int):
                    raise InvalidConfiguration(
                        f"{source}: [exchange.policy.rates_bps] {asset} must be an integer"
                    )
                rates[asset] = rate
            overrides["rates_bps"] = rates
        elif isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfiguration(f"{source}: [exchange.policy] {key} must be an integer")
        elif key in _POLICY_SECONDS:
            if value <= 0:
                raise InvalidConfiguration(
                    f"{source}: [exchange.policy] {key} must be a positive number of seconds"
                )
            overrides[_POLICY_SECONDS[key]] = timedelta(seconds=value)
        else:
            overrides[key] = value
    try:
        return CollateralPolicy.default(**overrides)
    except InvalidPolicy as exc:
        raise InvalidConfiguration(f"{source}: [exchange.policy]: {exc}") from exc


def parse_custodian_sources(
    table: Mapping[str, Any], *, source: str
) -> tuple[CustodianSource, ...]:
    """[exchange.custodians.<id>] tables: each names the custodian's published key registry."""
    custodians = []
    for custodian, entry in table.items():
        where = f"[exchange.custodians.{custodian}]"
        try:
            validate_party(custodian, what="custodian")
        except BridgeError as exc:
            raise InvalidConfiguration(f"{source}: {where}: {exc}") from exc
        if not isinstance(entry, Mapping):
            raise InvalidConfiguration(f"{source}: {where} must be a table")
        _check_keys(entry, frozenset({"registry_file"}), name=where[1:-1], source=source)
        registry_file = entry.get("registry_file")
        if not isinstance(registry_file, str) or not registry_file.strip():
            raise InvalidConfiguration(f"{source}: {where} registry_file is required")
        custodians.append(CustodianSource(custodian, registry_file))
    return tuple(custodians)


def parse_exchange(
    table: Mapping[str, Any], env: Mapping[str, str], *, source: str
) -> ExchangeConfig:
    """The [exchange] table and its sub-tables, with the ``MCB_EXCHANGE_*`` overrides."""
    _check_keys(table, frozenset(_EXCHANGE_KEYS), name="exchange", source=source)
    values: dict[str, Any] = {}
    for key in _EXCHANGE_STRINGS & set(table):
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise InvalidConfiguration(f"{source}: [exchange] {key} must be a non-empty string")
        values[key] = value
    if "port" in table:
        port = table["port"]
        if isinstance(port, bool) or not isinstance(port, int):
            raise InvalidConfiguration(f"{source}: [exchange] port must be an integer")
        values["port"] = port
    if "evaluate_interval_s" in table:
        interval = table["evaluate_interval_s"]
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise InvalidConfiguration(
                f"{source}: [exchange] evaluate_interval_s must be a number of seconds"
            )
        values["evaluate_interval_s"] = float(interval)
    if env.get(ENV_EXCHANGE_DATABASE_URL, "").strip():
        values["database_url"] = env[ENV_EXCHANGE_DATABASE_URL].strip()
    if env.get(ENV_EXCHANGE_URL, "").strip():
        values["url"] = env[ENV_EXCHANGE_URL].strip()
    values["custodians"] = parse_custodian_sources(
        _table(table, "custodians", source=source), source=source
    )
    values["policy"] = parse_policy(_table(table, "policy", source=source), source=source)
    hsm_table = _table(table, "hsm", source=source)
    values["hsm"] = parse_hsm(
        hsm_table, source=source, name="exchange.hsm", pin_env=ENV_EXCHANGE_HSM_PIN
    )
    try:
        return ExchangeConfig(**values)
    except InvalidConfiguration as exc:
        raise InvalidConfiguration(f"{source}: {exc}") from exc


def parse_config(
    document: Mapping[str, Any], env: Mapping[str, str], *, source: str = "<defaults>"
) -> CustodianConfig:
    """The configuration from a parsed TOML ``document`` (``{}`` for none) and the environment
    ``env`` (its ``MCB_*`` entries override the file). Unknown sections and keys are refused:
    a misspelt key silently falling back to a default would be worse."""
    if unknown := sorted(set(document) - _SECTIONS):
        raise InvalidConfiguration(
            f"{source}: unknown section(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_SECTIONS))}"
        )
    custodian = _table(document, "custodian", source=source)
    if unknown := sorted(set(custodian) - _CUSTODIAN_KEYS):
        raise InvalidConfiguration(
            f"{source}: unknown key(s) in [custodian]: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_CUSTODIAN_KEYS))}"
        )
    for key, value in custodian.items():
        if not isinstance(value, str):
            raise InvalidConfiguration(f"{source}: [custodian] {key} must be a string")
    custodian_id = custodian.get("id", DEFAULT_CUSTODIAN)
    try:
        validate_party(custodian_id, what="custodian")
    except BridgeError as exc:
        raise InvalidConfiguration(f"{source}: [custodian] id: {exc}") from exc

    database_url = custodian.get("database_url", DEFAULT_DATABASE_URL)
    where = f"{source}: [custodian] database_url"
    if env.get(ENV_DATABASE_URL, "").strip():
        database_url, where = env[ENV_DATABASE_URL].strip(), ENV_DATABASE_URL
    check_database_url(database_url, where=where)

    salt_secret_file = custodian.get("salt_secret_file")
    if env.get(ENV_SALT_SECRET_FILE, "").strip():
        salt_secret_file = env[ENV_SALT_SECRET_FILE].strip()

    assets_table = _table(document, "assets", source=source)
    assets = parse_assets(assets_table, source=source) if assets_table else DEFAULT_ASSETS

    kafka_env = _kafka_env(_table(document, "kafka", source=source), source=source)
    kafka_env.update(
        (key, value)
        for key, value in env.items()
        if key.startswith(KAFKA_ENV_PREFIX) and value.strip()
    )
    kafka = None
    if kafka_env:
        try:
            kafka = settings_from_env(kafka_env)
        except ConfigurationError as exc:
            raise InvalidConfiguration(f"{source} / environment: {exc}") from exc
    return CustodianConfig(
        custodian=custodian_id,
        database_url=database_url,
        assets=assets,
        salt_secret_file=salt_secret_file,
        kafka=kafka,
        serve=parse_serve(_table(document, "serve", source=source), source=source),
        hsm=parse_hsm(_table(document, "hsm", source=source), source=source),
        exchange=parse_exchange(_table(document, "exchange", source=source), env, source=source),
    )


def load_config(path: Path | None, env: Mapping[str, str]) -> CustodianConfig:
    """Read the file at ``path`` (else ``$MCB_CONFIG``, else none: the defaults) and apply the
    environment overrides."""
    if path is None and env.get(ENV_CONFIG, "").strip():
        path = Path(env[ENV_CONFIG].strip())
    if path is None:
        return parse_config({}, env)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidConfiguration(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidConfiguration(f"{path}: not UTF-8 text") from exc
    return parse_config(parse_toml(text, source=str(path)), env, source=str(path))
