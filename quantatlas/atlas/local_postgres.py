"""A throwaway PostgreSQL server on loopback, for tests and benchmarks: initdb + pg_ctl from
Debian's `postgresql` package in a temporary folder (as the `postgres` user when run as root:
PostgreSQL refuses to run as root), trust authentication, one database per `database()` call."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def unavailable() -> str | None:
    """Why a local server cannot be started here, or None when it can."""
    if _bin_dir() is None:
        return "the `postgresql` Debian package's binaries are not installed"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'quantatlas[postgres]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """Raises RuntimeError, with the reason, when no server can be made or started here."""

    def __init__(self):
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.bin = _bin_dir()
        self.tmp = Path(tempfile.mkdtemp(prefix="qa-pg-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.tmp, "postgres")
        self._started = False
        self._databases = 0

    def _run(self, *cmd):
        try:
            subprocess.run(self.as_user + [str(self.bin / cmd[0]), *cmd[1:]], check=True, capture_output=True,
                           text=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{cmd[0]} failed: {(e.stderr or e.stdout or '').strip()[-300:]}") from None
        except OSError as e:                         # runuser or the binary itself missing
            raise RuntimeError(f"{cmd[0]} could not run: {e}") from None

    def start(self) -> str:
        """Start the server; returns the URL of a fresh database `atlas`. Cleans up if it cannot."""
        data = self.tmp / "data"
        try:
            self._run("initdb", "-D", str(data), "-U", "atlas", "--auth=trust", "-E", "UTF8")
            self._run("pg_ctl", "-D", str(data), "-l", str(self.tmp / "log"), "-w", "-o",
                      f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
            self._started = True
            return self.database("atlas")
        except RuntimeError as e:
            log = self.tmp / "log"                   # pg_ctl's reason is in the server log, gone after stop()
            tail = log.read_text(errors="replace").strip()[-300:] if log.is_file() else ""
            self.stop()
            raise RuntimeError(f"{e}{' | server log: ' + tail if tail else ''}") from None

    def database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        self._databases += 1
        name = name or f"atlas_{self._databases}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "atlas", name)
        return f"postgresql://atlas@127.0.0.1:{self.port}/{name}"

    def stop(self):
        try:
            if self._started:
                self._started = False
                self._run("pg_ctl", "-D", str(self.tmp / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
