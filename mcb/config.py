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

Environment overrides (they win over the file): ``MCB_DATABASE_URL``, ``MCB_SALT_SECRET_FILE``
and every ``MCB_KAFKA_*`` name of :func:`bridge.kafka.settings_from_env`, which validates the
Kafka settings. ``MCB_CONFIG`` names the file when ``--config`` is not given.

What it does not do: open the database, read the salt secret, or connect to Kafka.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from attestations.amounts import Asset
from attestations.errors import BridgeError, ConfigurationError
from attestations.statement import validate_party
from bridge.kafka import ENV_PREFIX as KAFKA_ENV_PREFIX
from bridge.kafka import KafkaSettings, settings_from_env

ENV_CONFIG: Final = "MCB_CONFIG"
ENV_DATABASE_URL: Final = "MCB_DATABASE_URL"
ENV_SALT_SECRET_FILE: Final = "MCB_SALT_SECRET_FILE"  # noqa: S105 (a variable name, no secret)
DEFAULT_CUSTODIAN: Final = "custodian-bank"
DEFAULT_DATABASE_URL: Final = "sqlite:///var/custodian.sqlite3"
DEFAULT_ASSETS: Final = (Asset("BENJI", 6), Asset("USDC", 6), Asset("BTC", 8), Asset("ETH", 18))
SUPPORTED_BACKENDS: Final = frozenset({"sqlite", "postgresql"})

_SECTIONS: Final = frozenset({"custodian", "assets", "kafka"})
_CUSTODIAN_KEYS: Final = frozenset({"id", "database_url", "salt_secret_file"})


class InvalidConfiguration(ConfigurationError):
    """The configuration file or an environment override is malformed or inconsistent."""

    reason = "invalid_configuration"


@dataclass(frozen=True, slots=True)
class CustodianConfig:
    """What the ``mcb custodian`` commands need. ``kafka`` is None when no bootstrap server is
    configured (the book commands do not need one)."""

    custodian: str = DEFAULT_CUSTODIAN
    database_url: str = DEFAULT_DATABASE_URL
    assets: tuple[Asset, ...] = DEFAULT_ASSETS
    salt_secret_file: str | None = None
    kafka: KafkaSettings | None = None

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
