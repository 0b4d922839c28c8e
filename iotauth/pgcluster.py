"""A throwaway PostgreSQL cluster for tests, benchmarks and the demo: never a system service.

``TempPostgres`` runs Debian's ``initdb`` and ``postgres`` from the installed server (found on PATH
or under ``/usr/lib/postgresql/*/bin``) in a fresh temporary directory, listening on a free port
of 127.0.0.1 only (no Unix socket), with scram-sha-256 passwords. PostgreSQL refuses to run as
root, so as root the cluster runs as the unprivileged user ``nobody`` (``runuser``). It is
our own child process (``setpriv`` execs it, with a parent-death signal so that even a killed
run leaves no cluster behind), stopped by its PID, never by name::

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import psycopg

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
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postgres-parent")
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
        """``postgres`` as our own child (setpriv execs it: same PID), with a parent-death signal
        so that even a killed test run leaves no cluster behind."""
        import pwd

        creds: list[str] = []
        if self._as_root:
            entry = pwd.getpwnam(_RUN_AS)
            creds = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
        for _ in range(5):
            self.port = self.port or _free_port()
            cmd = [
                "setpriv", *creds, "--pdeathsig=INT", "--",
                str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                "-c", "max_connections=200", "-c", "shared_buffers=32MB",
            ]  # fmt: skip
            with self.log.open("ab") as log:
                # Spawned from one long-lived thread: the parent-death signal fires when the
                # *thread* that forked ends, and a restart may come from a short-lived one.
                proc = self._spawner.submit(
                    subprocess.Popen,
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ).result()
            if self._wait_ready(proc):
                self._proc, self.pid = proc, proc.pid
                return
            self.port = 0  # the port was taken meanwhile: try another
        msg = f"PostgreSQL did not start: {self.log.read_text(errors='replace')[-500:]}"
        raise RuntimeError(msg)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        import psycopg

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                self._superuser("postgres", connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        proc.kill()
        proc.wait()
        return False

    def stop(self) -> None:
        """Fast shutdown of our own postmaster (SIGINT to its PID), waiting until it is gone."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self.pid = None

    def resume(self) -> None:
        """Start the stopped cluster again on the same port."""
        if self._proc is None:
            self._start_server()

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_for)
        self._start_server()

    def close(self) -> None:
        self.stop()
        self._spawner.shutdown()
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

    def _superuser(self, database: str, *, connect_timeout: int) -> psycopg.Connection[Any]:
        """A connection to our cluster as its superuser (whose password only we know)."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self._superpass,
            dbname=database,
            autocommit=True,
            connect_timeout=connect_timeout,
        )

    def _psql(self, sql: str, *, database: str) -> None:
        with self._superuser(database, connect_timeout=10) as conn:
            conn.execute(sql.encode())
