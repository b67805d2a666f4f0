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


def unavailable() -> str | None:
    """Why a local server cannot be started here, or None when it can."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
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
    def __init__(self):
        why = unavailable()
        if why:
            raise RuntimeError(why)
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        self.bin = Path(bins[-1]).parent
        self.tmp = Path(tempfile.mkdtemp(prefix="qa-pg-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.tmp, "postgres")
        self._databases = 0

    def _run(self, *cmd):
        subprocess.run(self.as_user + [str(self.bin / cmd[0]), *cmd[1:]], check=True, capture_output=True, text=True)

    def start(self) -> str:
        """Start the server; returns the URL of a fresh database `atlas`."""
        data = self.tmp / "data"
        self._run("initdb", "-D", str(data), "-U", "atlas", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.tmp / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
        return self.database("atlas")

    def database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        self._databases += 1
        name = name or f"atlas_{self._databases}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "atlas", name)
        return f"postgresql://atlas@127.0.0.1:{self.port}/{name}"

    def stop(self):
        try:
            self._run("pg_ctl", "-D", str(self.tmp / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
