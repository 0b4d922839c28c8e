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
from iotauth.testing import SoftTpm
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


# -- a software TPM (swtpm) per test session -------------------------------------------------------

SWTPM = _tool("swtpm", "/usr/bin/swtpm")
TPM2_GETCAP = _tool("tpm2_getcap")


def _tpm2_provider() -> str | None:
    """The tpm2-openssl provider module, where the system OpenSSL looks for providers."""
    if OPENSSL is None:
        return None
    out = subprocess.run(
        [OPENSSL, "version", "-m"], capture_output=True, text=True, check=False
    ).stdout
    modules = out.partition('"')[2].rpartition('"')[0]
    path = Path(modules) / "tpm2.so"
    return str(path) if modules and path.exists() else None


TPM2_PROVIDER = _tpm2_provider()
needs_swtpm = needs(SWTPM, TPM2_GETCAP, TPM2_PROVIDER, what="swtpm, tpm2-tools and tpm2-openssl")


def _soft_tpm(state_dir: Path) -> SoftTpm:
    if SWTPM is None:
        pytest.fail("swtpm is not installed; .ci/run installs swtpm and swtpm-tools")
    try:
        return SoftTpm(state_dir, swtpm=SWTPM).start()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def transient_handles(tpm: SoftTpm) -> list[str]:
    """The TPM's loaded transient objects (each leaked one takes one of its three slots)."""
    if TPM2_GETCAP is None:
        pytest.fail("tpm2_getcap is not installed; .ci/run installs tpm2-tools")
    out = subprocess.run(
        [TPM2_GETCAP, "handles-transient"],
        capture_output=True,
        text=True,
        env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti},
        check=True,
        timeout=30,
    ).stdout
    return [line.strip("- ").strip() for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def swtpm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftTpm]:
    tpm = _soft_tpm(tmp_path_factory.mktemp("swtpm"))
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm(swtpm_session: SoftTpm) -> Iterator[SoftTpm]:
    """The session's swtpm; the test fails if it leaves an object loaded in the TPM."""
    assert transient_handles(swtpm_session) == [], "an earlier test leaked TPM objects"
    yield swtpm_session
    assert transient_handles(swtpm_session) == [], "this test left objects loaded in the TPM"


@pytest.fixture
def make_swtpm(tmp_path: Path) -> Iterator[Callable[[], SoftTpm]]:
    """Extra swtpms (another device's TPM), each stopped at the end of the test."""
    made: list[SoftTpm] = []

    def make() -> SoftTpm:
        tpm = _soft_tpm(tmp_path / f"swtpm-{len(made)}")
        made.append(tpm)
        return tpm

    yield make
    for tpm in made:
        tpm.stop()


# -- SoftHSM2: a real PKCS#11 token in tmp_path ------------------------------------------------


def _softhsm_module() -> str | None:
    """The SoftHSM2 PKCS#11 module: the Debian path, else wherever the package put it."""
    for candidate in (
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ):
        if Path(candidate).exists():
            return candidate
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return None
    listing = subprocess.run(
        [dpkg, "-L", "softhsm2"], capture_output=True, text=True, check=False, timeout=30
    )
    return next((f for f in listing.stdout.split() if f.endswith("/libsofthsm2.so")), None)


SOFTHSM_UTIL = _tool("softhsm2-util")
SOFTHSM_MODULE = _softhsm_module()
needs_softhsm = needs(SOFTHSM_UTIL, SOFTHSM_MODULE, what="softhsm2")


@dataclass
class SoftHSM:
    """One SoftHSM2 token store in a temporary directory; ``env`` points a process at it."""

    conf: Path
    module: str
    label: str = "iotauth-ca"
    pin: str = "4321-user"
    so_pin: str = "8765-so"

    @property
    def env(self) -> dict[str, str]:
        return {
            "SOFTHSM2_CONF": str(self.conf),
            "IOTAUTH_PKCS11_MODULE": self.module,
            "IOTAUTH_PKCS11_PIN": self.pin,
        }

    def uri(self, obj: str = "issuing", token: str | None = None) -> str:
        return f"pkcs11:token={token or self.label};object={obj}"

    def init_token(self, label: str) -> None:
        assert SOFTHSM_UTIL is not None
        pins = ["--pin", self.pin, "--so-pin", self.so_pin]
        subprocess.run(
            [SOFTHSM_UTIL, "--init-token", "--free", "--label", label, *pins],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            capture_output=True,
            check=True,
            timeout=60,
        )

    def objects(self, label: str | None = None) -> list[str]:
        """Labels of the token's objects, listed by a separate process (this one may hold the
        module initialized with an older view of the token store)."""
        script = (
            "import sys, pkcs11\n"
            "lib = pkcs11.lib(sys.argv[1])\n"
            "with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3]) as s:\n"
            "    labels = sorted(str(o[pkcs11.Attribute.LABEL]) for o in s.get_objects())\n"
            "print('\\n'.join(labels))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, self.module, label or self.label, self.pin],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return proc.stdout.split()


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHSM:
    """A fresh SoftHSM2 token; this process's environment points at it (for in-process PKIs)."""
    if SOFTHSM_UTIL is None or SOFTHSM_MODULE is None:
        pytest.fail("softhsm2 is not installed; .ci/run installs it")
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    hsm = SoftHSM(conf, SOFTHSM_MODULE)
    hsm.init_token(hsm.label)
    for name, value in hsm.env.items():
        monkeypatch.setenv(name, value)
    return hsm


# -- PostgreSQL: a throwaway cluster per worker ------------------------------------------------

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
