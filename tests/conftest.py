"""Fixtures shared by every test: fresh PKIs on disk, the real CLI, and openssl as a judge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iotauth.pgcluster import TempPostgres, find_postgres_bin
from provisioning.pki import PKI

CLI = [sys.executable, "-m", "iotauth"]


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    return tmp_path / "pki"


@pytest.fixture
def pki(pki_dir: Path) -> Iterator[PKI]:
    ca = PKI.init(pki_dir, trust_domain="fleet.example", server_names=["broker.test"])
    yield ca
    ca.close()


@pytest.fixture
def foreign_pki(tmp_path: Path) -> Iterator[PKI]:
    """A second, unrelated PKI with the same trust domain name: it must never be trusted."""
    ca = PKI.init(tmp_path / "foreign-pki", trust_domain="fleet.example")
    yield ca
    ca.close()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result]:
    """Run the real ``iotauth`` command in a subprocess, with tmp_path as working directory."""

    def run(*args: str, env: dict[str, str] | None = None, check: bool | None = None) -> Result:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("IOTAUTH_")}
        full_env = {**inherited, "IOTAUTH_STATION_ID": "test-station", **(env or {})}
        proc = subprocess.run(
            [*CLI, *args],
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check is True:
            assert proc.returncode == 0, proc.stderr
        if check is False:
            assert proc.returncode != 0, proc.stdout
        return result

    return run


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """The contract for bad input: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


OPENSSL = shutil.which("openssl")


def openssl(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the system openssl: the independent judge of what we issue."""
    if OPENSSL is None:
        pytest.fail("openssl is not installed; .ci/run installs it")
    return subprocess.run(
        [OPENSSL, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        input=stdin.decode() if stdin else None,
    )


def openssl_verify(
    pki_dir: Path, cert: Path, *, purpose: str = "sslclient", crl: bool = False
) -> subprocess.CompletedProcess[str]:
    args: list[str | Path] = ["verify", "-purpose", purpose, "-CAfile", pki_dir / "root.crt"]
    args += ["-untrusted", pki_dir / "issuing.crt"]
    if crl:
        args += ["-crl_check", "-CRLfile", pki_dir / "crl.pem"]
    return openssl(*args, cert)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("64k")`` mounts a real, tiny filesystem that a test can fill to the last byte."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True
        )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until only ``leave`` bytes (rounded to pages) are free; returns the filler."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # the disk is full: that was the point
    finally:
        os.close(fd)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    os.truncate(filler, max(0, filler.stat().st_size + free - leave))
    return filler


def _tool(name: str, *fallbacks: str) -> str | None:
    return shutil.which(name) or next((f for f in fallbacks if Path(f).exists()), None)


MOSQUITTO = _tool("mosquitto", "/usr/sbin/mosquitto")
MOSQUITTO_PUB = _tool("mosquitto_pub")
MOSQUITTO_SUB = _tool("mosquitto_sub")


def needs(*tools: str | None, what: str) -> pytest.MarkDecorator:
    """Skip on a developer machine without ``what``; under CI (CI=true) a missing tool fails."""
    missing = any(tool is None for tool in tools)
    return pytest.mark.skipif(
        missing and not os.environ.get("CI"), reason=f"{what} not installed (.ci/run installs it)"
    )


needs_mosquitto = needs(MOSQUITTO, what="mosquitto")
needs_mosquitto_clients = needs(MOSQUITTO_PUB, MOSQUITTO_SUB, what="mosquitto-clients")


POSTGRES_BIN = find_postgres_bin()


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    """One throwaway PostgreSQL cluster per test worker (initdb + postgres as ``nobody`` on a
    free 127.0.0.1 port, in a temporary directory), stopped by its PID at the end."""
    if POSTGRES_BIN is None:
        if os.environ.get("CI"):
            pytest.fail("postgresql is not installed; .ci/run installs it")
        pytest.skip("postgresql not installed (.ci/run installs it)")
    with TempPostgres() as cluster:
        yield cluster


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def pg_url(postgres: TempPostgres, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty database; its password in PGPASSWORD (inherited by CLI subprocesses)."""
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    return postgres.create_database(f"t{os.getpid()}_{next(_databases)}")


BACKENDS = ["sqlite", "postgresql"]


def make_pki(backend: str, request: pytest.FixtureRequest, path: Path, **kwargs: object) -> PKI:
    """A PKI on either registry: the same tests run against both (docs/FACTORY.md)."""
    if backend == "postgresql":
        kwargs["registry"] = request.getfixturevalue("pg_url")
    return PKI.init(path, trust_domain="fleet.example", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS)
def backend_pki(request: pytest.FixtureRequest, pki_dir: Path) -> Iterator[PKI]:
    """``pki`` on SQLite and on PostgreSQL; modules that must hold for both use it as ``pki``."""
    ca = make_pki(request.param, request, pki_dir, server_names=["broker.test"])
    yield ca
    ca.close()
