"""A throwaway PostgreSQL cluster for tests, benchmarks and the demo: never a system service.

``TempPostgres`` runs Debian's ``initdb`` and ``postgres`` from the installed server (found on PATH
or under ``/usr/lib/postgresql/*/bin``) in a fresh temporary directory, listening on a free port
of 127.0.0.1 only (no Unix socket), with scram-sha-256 passwords. PostgreSQL refuses to run as
root, so as root the cluster runs as the unprivileged user ``nobody`` (``runuser``). It is
stopped by the PID in its own ``postmaster.pid``, never by name::

    with TempPostgres() as pg:
        url = pg.create_database("t1")      # postgresql://iotauth@127.0.0.1:PORT/t1
        os.environ["PGPASSWORD"] = pg.password

``restart()`` stops and starts the same cluster on the same port (the fault tests use it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["PostgresMissingError", "TempPostgres", "find_postgres_bin"]

_RUN_AS = "nobody"


class PostgresMissingError(RuntimeError):
    """No PostgreSQL server binaries on this machine (Debian: apt-get install postgresql)."""


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, newest major version first."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
        reverse=True,
    )
    return Path(candidates[0]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TempPostgres:
    """One PostgreSQL cluster in a temporary directory; a context manager."""

    def __init__(self, *, user: str = "iotauth") -> None:
        found = find_postgres_bin()
        if found is None:
            msg = "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
            raise PostgresMissingError(msg)
        self.bin = found
        self.user = user
        self.password = secrets.token_urlsafe(16)
        self._superpass = secrets.token_urlsafe(16)
        self.port = 0
        self.pid: int | None = None
        self._root = Path(tempfile.mkdtemp(prefix="iotauth-pg-"))
        self.data = self._root / "data"
        self.log = self._root / "postgres.log"
        self._as_root = os.geteuid() == 0

    # -- lifecycle -----------------------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", _RUN_AS, "--", *args] if self._as_root else list(args)

    def start(self) -> Self:
        if self._as_root:
            import pwd

            entry = pwd.getpwnam(_RUN_AS)
            os.chown(self._root, entry.pw_uid, entry.pw_gid)
        pwfile = self._root / "pw"
        pwfile.write_text(self._superpass + "\n")
        if self._as_root:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._cmd(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        pwfile.unlink()
        self._start_server()
        self._psql(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
            database="postgres",
        )
        return self

    def _start_server(self) -> None:
        for _ in range(5):
            self.port = self.port or _free_port()
            options = (
                f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                "-c max_connections=200 -c shared_buffers=32MB"
            )
            proc = subprocess.run(
                self._cmd(
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ),
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            if proc.returncode == 0:
                self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
                return
            self.port = 0  # the port was taken meanwhile: try another
        msg = f"PostgreSQL did not start: {self.log.read_text(errors='replace')[-500:]}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        """Fast shutdown of our own postmaster (SIGINT to its PID), waiting until it is gone."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.pid = None

    def resume(self) -> None:
        """Start the stopped cluster again on the same port."""
        if self.pid is None:
            self._start_server()

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_for)
        self._start_server()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- databases -----------------------------------------------------------------------------

    def url(self, database: str, *, user: str | None = None) -> str:
        return f"postgresql://{user or self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database owned by the test user; returns its URL (no password in it)."""
        self._psql(f'CREATE DATABASE "{name}" OWNER {self.user}', database="postgres")
        return self.url(name)

    def _psql(self, sql: str, *, database: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self._superpass,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            conn.execute(sql.encode())
