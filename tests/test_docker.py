"""What can be checked of docker/ without a Docker engine: the files parse, what they name exists, the entry
point runs, and the commands the compose services run are valid for this command line."""

import fnmatch
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from lighter_sink.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    joined = dockerfile.read_text().replace("\\\n", " ")
    result = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_the_compose_file_has_the_expected_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"minio", "create-bucket", "job", "verify"}
    depends = {name: set(service.get("depends_on", {})) for name, service in compose["services"].items()}
    assert depends == {"minio": set(), "create-bucket": {"minio"}, "job": {"create-bucket"}, "verify": {"job"}}
    assert "healthcheck" in compose["services"]["minio"]


def test_every_file_compose_names_exists(compose: dict[str, Any]) -> None:
    built = [s for s in compose["services"].values() if "build" in s]
    assert built
    for service in built:
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]).is_file()
    image = compose["services"]["job"]["image"]
    assert compose["services"]["verify"]["image"] == image  # verify runs what the job built


def test_every_file_the_dockerfile_copies_exists_and_is_sent_to_the_build() -> None:
    dockerfile = DOCKER / "Dockerfile"
    ignore = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [args.split() for keyword, args in _instructions(dockerfile) if keyword == "COPY"]
    assert copies
    for args in copies:
        for source in args[:-1]:
            assert not source.startswith("--"), "COPY --from/--chown is not expected here"
            assert (ROOT / source).exists(), source
            # The allow-list re-includes every source the Dockerfile copies.
            assert any(fnmatch.fnmatch(source.rstrip("/"), p[1:].rstrip("/")) for p in ignore if p.startswith("!"))


def test_the_entry_point_runs_in_this_environment() -> None:
    instructions = dict(_instructions(DOCKER / "Dockerfile"))
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    cmd = json.loads(instructions["CMD"])
    assert entrypoint == ["lighter-sink"]
    assert cmd == ["--help"]
    executable = Path(sys.executable).parent / entrypoint[0]
    done = subprocess.run([str(executable), *cmd], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("demo", "verify", "inspect", "bench"):
        assert command in done.stdout


def test_the_job_writes_where_verify_reads_and_both_commands_parse(compose: dict[str, Any]) -> None:
    parser = build_parser()
    job = parser.parse_args(compose["services"]["job"]["command"])
    check = parser.parse_args(compose["services"]["verify"]["command"])
    assert (job.command, check.command) == ("demo", "verify")
    assert job.url == check.url
    for args in (job, check):
        options = dict(args.storage_option)
        assert urlparse(options["endpoint_url"]).hostname == "minio"  # the compose service's name
    bucket = urlparse(job.url).netloc
    create = " ".join(compose["services"]["create-bucket"]["command"])
    assert f"local/{bucket}" in shlex.split(create)[-1]


def test_credentials_reach_the_lighter_sink_containers_through_the_environment(compose: dict[str, Any]) -> None:
    for name in ("job", "verify"):
        service = compose["services"][name]
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(service["environment"])
        assert not any("secret" in part.lower() or "key=" in part for part in service["command"])
