"""The production-shaped stack in docker/, checked by parsing (no Docker engine runs here).

compose.yaml is read with PyYAML; the Dockerfile with the small line parser below, which joins
continuation lines, drops comments and splits each instruction into its keyword and arguments
(enough for the checks here, not a full Dockerfile grammar: no heredocs, no parser directives
other than comments).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
EXPECTED_SERVICES = {"kafka", "postgres", "custodian"}
MCB_WORKDIR = "/var/lib/mcb"
ROOT_USERS = {"root", "0"}


@dataclass(frozen=True, slots=True)
class Instruction:
    line: int
    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, with continuation lines joined (``\\`` at the end of a line)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments may appear between continuation lines too
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped.removesuffix("\\").strip() if continued else stripped)
        if continued:
            continue
        keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), arguments.strip()))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the last instruction ends with a continuation")
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The argument list of an exec-form (JSON array) ENTRYPOINT, CMD or VOLUME."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(item, str) for item in value), arguments
    return value


def copy_sources(instruction: Instruction) -> list[str]:
    """The source paths of a COPY (flags such as --chown dropped, destination removed)."""
    words = [word for word in shlex.split(instruction.arguments) if not word.startswith("--")]
    assert len(words) >= 2, f"line {instruction.line}: COPY needs a source and a destination"
    return words[:-1]


def image_tag(image: str) -> str:
    """The tag of ``name[:tag][@digest]``; empty when there is none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.partition(":")[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text(encoding="utf-8"))


def keyword_index(instructions: list[Instruction], keyword: str) -> int:
    positions = [i for i, ins in enumerate(instructions) if ins.keyword == keyword]
    assert positions, f"the Dockerfile has no {keyword}"
    return positions[0]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        return dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def named_volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volumes a service mounts (short or long syntax), as {volume: target}."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, _, rest = entry.partition(":")
            target = rest.split(":", 1)[0]
        else:
            if entry.get("type", "volume") != "volume":
                continue
            source, target = entry.get("source", ""), entry["target"]
        if source and not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


# --- the parser itself ----------------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM base:1\n\nRUN a \\\n  # inner comment\n  && b\nUSER app\n"
    assert parse_dockerfile(text) == [
        Instruction(2, "FROM", "base:1"),
        Instruction(4, "RUN", "a && b"),
        Instruction(7, "USER", "app"),
    ]


def test_parser_rejects_a_dangling_continuation() -> None:
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM base:1\nRUN a \\\n")


@pytest.mark.parametrize(
    ("image", "tag"),
    [
        ("postgres:16.10-bookworm", "16.10-bookworm"),
        ("apache/kafka:3.9.1", "3.9.1"),
        ("registry:5000/team/app", ""),
        ("registry:5000/team/app:1.2@sha256:abc", "1.2"),
        ("python", ""),
    ],
)
def test_image_tag(image: str, tag: str) -> None:
    assert image_tag(image) == tag


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_has_the_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service, f"{name}: no image (a built service names its image too)"
        tag = image_tag(service["image"])
        assert tag, f"{name}: image {service['image']!r} has no version tag"
        assert tag != "latest", f"{name}: image {service['image']!r} uses latest"


def test_every_service_is_health_checked_or_waits_for_health(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on")
        if depends_on is not None:
            assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form"
            for dependency, spec in depends_on.items():
                assert dependency in services, f"{name} depends on unknown {dependency}"
                assert spec.get("condition") in {
                    "service_healthy",
                    "service_completed_successfully",
                }, f"{name}: depends_on {dependency} without a health condition"
                assert "healthcheck" in services[dependency], f"{dependency}: no healthcheck"
        else:
            assert "healthcheck" in service, f"{name}: neither healthcheck nor depends_on"
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert isinstance(test, list), f"{name}: healthcheck test must be a list"
            assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test form {test[0]}"
            assert len(test) > 1, f"{name}: empty healthcheck"


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for service in services.values():
        used |= set(named_volume_mounts(service))
    assert used, "no service keeps its state on a named volume"
    assert used <= declared, f"volumes used but not declared: {sorted(used - declared)}"
    assert declared <= used, f"volumes declared but unused: {sorted(declared - used)}"


def test_stateful_services_keep_state_on_volumes(services: dict[str, dict[str, Any]]) -> None:
    kafka_env = environment(services["kafka"])
    assert kafka_env["KAFKA_LOG_DIRS"] in named_volume_mounts(services["kafka"]).values()
    assert "/var/lib/postgresql/data" in named_volume_mounts(services["postgres"]).values()
    custodian_targets = set(named_volume_mounts(services["custodian"]).values())
    assert MCB_WORKDIR in custodian_targets
    assert softhsm_tokendir() in custodian_targets


def test_kafka_runs_in_kraft_mode_with_consistent_listeners(
    services: dict[str, dict[str, Any]],
) -> None:
    env = environment(services["kafka"])
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env

    def names(value: str) -> set[str]:
        return {item.split("://", 1)[0] for item in value.split(",")}

    listeners = names(env["KAFKA_LISTENERS"])
    advertised = names(env["KAFKA_ADVERTISED_LISTENERS"])
    protocol_map = {
        item.split(":", 1)[0] for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    }
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert listeners <= protocol_map
    assert advertised <= listeners
    assert controller in listeners
    assert controller not in advertised, "the controller listener is not for clients"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    node_id = env["KAFKA_NODE_ID"]
    voter_port = next(
        item.rsplit(":", 1)[1]
        for item in env["KAFKA_LISTENERS"].split(",")
        if item.startswith(f"{controller}://")
    )
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:{voter_port}"
    assert env["CLUSTER_ID"].startswith("${KAFKA_CLUSTER_ID:?")


def test_postgres_16_takes_its_password_from_a_secret(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    postgres = services["postgres"]
    assert image_tag(postgres["image"]).startswith("16.")
    env = environment(postgres)
    assert "POSTGRES_PASSWORD" not in env, "the password must not sit in the environment"
    assert env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "postgres_password" in postgres["secrets"]
    secret = compose["secrets"]["postgres_password"]
    assert secret == {"environment": "POSTGRES_PASSWORD"}


def test_custodian_runs_the_demo_unprivileged(services: dict[str, dict[str, Any]]) -> None:
    custodian = services["custodian"]
    # The image's entry point is mcb, so the command holds only its arguments.
    assert custodian["command"] == ["demo", "--workdir", MCB_WORKDIR]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert image_tag(custodian["image"]) == pyproject["project"]["version"]
    build = custodian["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert custodian.get("read_only") is True
    assert custodian.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in custodian.get("security_opt", [])


def test_env_example_covers_every_variable(compose: dict[str, Any]) -> None:
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    referenced |= {
        secret["environment"]
        for secret in (compose.get("secrets") or {}).values()
        if "environment" in secret
    }
    example: dict[str, str] = {}
    for line in (DOCKER / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=value"
            example[key.strip()] = value.strip()
    assert referenced <= set(example), f"missing in .env.example: {referenced - set(example)}"
    assert example["POSTGRES_PASSWORD"] == "", "the example must not ship a password"


# --- softhsm2.conf ------------------------------------------------------------------------------


def softhsm_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in (DOCKER / "softhsm2.conf").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"softhsm2.conf: {line!r} is not key = value"
            settings[key.strip()] = value.strip()
    return settings


def softhsm_tokendir() -> str:
    return softhsm_settings()["directories.tokendir"].rstrip("/")


def test_softhsm_conf_keeps_tokens_in_files() -> None:
    settings = softhsm_settings()
    assert settings["objectstore.backend"] == "file"
    assert softhsm_tokendir().startswith("/var/lib/")


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_starts_from_the_pinned_python_base(dockerfile: list[Instruction]) -> None:
    assert dockerfile[0].keyword == "FROM"
    assert [i.keyword for i in dockerfile].count("FROM") == 1
    assert dockerfile[0].arguments == "python:3.11-slim-bookworm"
    assert image_tag(dockerfile[0].arguments) not in {"", "latest"}


def test_dockerfile_drops_root_before_running(dockerfile: list[Instruction]) -> None:
    entry = keyword_index(dockerfile, "ENTRYPOINT")
    users = [i for i in dockerfile[:entry] if i.keyword == "USER"]
    assert users, "no USER before ENTRYPOINT: the container would run as root"
    user = users[-1].arguments.split(":", 1)[0]
    assert user not in ROOT_USERS
    for later in dockerfile[entry:]:
        assert later.keyword != "USER" or later.arguments.split(":", 1)[0] not in ROOT_USERS
    if any(i.keyword == "CMD" for i in dockerfile):
        assert keyword_index(dockerfile, "CMD") > dockerfile.index(users[-1])
    assert exec_form(dockerfile[entry].arguments) == ["mcb"]


def test_dockerfile_installs_softhsm_and_pinned_dependencies(
    dockerfile: list[Instruction],
) -> None:
    runs = [i for i in dockerfile if i.keyword == "RUN"]
    assert any(re.search(r"apt-get install .*\bsofthsm2\b", i.arguments) for i in runs)
    pip = [i for i in runs if "pip install" in i.arguments]
    assert len(pip) == 1
    assert '-c constraints.txt ".[fast]"' in pip[0].arguments
    copies = [i for i in dockerfile if i.keyword == "COPY" and "constraints.txt" in copy_sources(i)]
    assert copies, "constraints.txt is never copied into the image"
    assert dockerfile.index(copies[0]) < dockerfile.index(pip[0])
    assert dockerfile.index(pip[0]) < keyword_index(dockerfile, "USER"), "pip runs as root"


def test_dockerfile_copies_only_what_exists(dockerfile: list[Instruction]) -> None:
    for instruction in dockerfile:
        if instruction.keyword in {"COPY", "ADD"}:
            assert instruction.keyword == "COPY", "use COPY, not ADD"
            for source in copy_sources(instruction):
                assert (ROOT / source).exists(), f"line {instruction.line}: {source} is missing"


def test_dockerfile_copies_every_installed_package(dockerfile: list[Instruction]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    copied = {
        source.rstrip("/")
        for instruction in dockerfile
        if instruction.keyword == "COPY"
        for source in copy_sources(instruction)
    }
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.removesuffix("*") in copied, f"package {pattern} is not copied"
    assert pyproject["project"]["readme"] in copied
    assert "mcb" in pyproject["project"]["scripts"]


def test_dockerfile_points_softhsm_at_its_config(dockerfile: list[Instruction]) -> None:
    env = " ".join(i.arguments for i in dockerfile if i.keyword == "ENV")
    match = re.search(r"SOFTHSM2_CONF=(\S+)", env)
    assert match, "SOFTHSM2_CONF is not set"
    destinations = {
        shlex.split(i.arguments)[-1]: copy_sources(i) for i in dockerfile if i.keyword == "COPY"
    }
    assert destinations.get(match.group(1)) == ["docker/softhsm2.conf"]
    volumes = [v for i in dockerfile if i.keyword == "VOLUME" for v in exec_form(i.arguments)]
    assert softhsm_tokendir() in volumes
    assert MCB_WORKDIR in volumes
