"""The reference agent's file sandbox: every path is opened relative to the sandbox directory.

A path check followed by an open can race (a directory swapped for a symlink in between), and
``Path.resolve`` does not notice hard links. So each component is opened with ``O_NOFOLLOW``
relative to the directory opened before it (``dir_fd``), starting at the sandbox; a file with
more than one link is refused (it may be a hard link to a file outside); and only paths
relative to the sandbox are ever reported back, never the local absolute path.

Only regular files are read or written: the open is non-blocking, so a FIFO (whose open would
wait for a writer for good) or a device is refused after ``fstat`` instead of hanging the
agent. Reads are bounded by size (MAX_READ) and time (READ_SECONDS, checked between chunks; the
agent also stops waiting for the whole action after ACTION_SECONDS, see desktop.perform_bounded).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from cpa_scheduler import errors

MAX_READ = 1024 * 1024
READ_SECONDS = 10.0
_CHUNK = 64 * 1024
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class Sandbox:
    """A directory the agent may read and write below, and nothing else."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root

    def write(self, name: str, data: bytes) -> dict[str, object]:
        """Write ``data`` to ``name`` (relative to the sandbox); answers the relative path."""
        parts = _parts(name)
        with self._parent(parts, create=True) as parent:
            fd = self._open(parts, parent, os.O_WRONLY | os.O_CREAT)
            try:
                os.ftruncate(fd, 0)  # only now: truncating before the checks could hit a link
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        return {"path": "/".join(parts), "bytes": len(data)}

    def read(self, name: str) -> str:
        parts = _parts(name)
        with self._parent(parts, create=False) as parent:
            fd = self._open(parts, parent, os.O_RDONLY)
            deadline = time.monotonic() + READ_SECONDS
            chunks: list[bytes] = []
            size = 0
            try:
                while size <= MAX_READ:
                    chunk = os.read(fd, _CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if time.monotonic() > deadline:
                        raise errors.PermanentError(
                            f"Reading {'/'.join(parts)!r} took longer than {READ_SECONDS:g} s; "
                            "the file is on a slow or hung drive."
                        )
            finally:
                os.close(fd)
            data = b"".join(chunks)
        if len(data) > MAX_READ:
            raise errors.PermanentError(
                f"The file {'/'.join(parts)!r} is larger than {MAX_READ} bytes; read a smaller file."
            )
        # NUL cannot travel in a jsonb result; undecodable bytes become U+FFFD too.
        return data.decode("utf-8", "replace").replace("\x00", "\ufffd")

    @contextlib.contextmanager
    def _parent(self, parts: list[str], *, create: bool) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            for i, part in enumerate(parts[:-1]):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                try:
                    child = os.open(
                        part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd
                    )
                except OSError as exc:
                    where = "/".join(parts[: i + 1])
                    raise errors.PermanentError(
                        f"The folder {where!r} in the sandbox cannot be used: "
                        f"{_reason(exc)}. Use a plain folder inside the sandbox."
                    ) from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _open(self, parts: list[str], parent: int, flags: int) -> int:
        rel = "/".join(parts)
        try:
            # Non-blocking: opening a FIFO would otherwise wait for its other end for good.
            fd = os.open(
                parts[-1], flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK | _NOCTTY, 0o600, dir_fd=parent
            )
        except OSError as exc:
            raise errors.PermanentError(
                f"The file {rel!r} in the sandbox cannot be opened: {_reason(exc)}."
            ) from None
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device, socket or folder"
            problem = f"it is {kind}, not a regular file"
        elif info.st_nlink > 1:
            problem = "it has other hard links, which may lead outside the sandbox"
        if problem is not None:
            os.close(fd)
            raise errors.PermanentError(f"The file {rel!r} in the sandbox is refused: {problem}.")
        os.set_blocking(fd, True)  # a regular file: back to plain reads and writes
        return fd


def _parts(name: str) -> list[str]:
    parts = [p for p in str(name).replace("\\", "/").lstrip("/~").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise errors.PermanentError(
            f"The path {name!r} is outside the agent's sandbox; give a path inside it, "
            "without '..'."
        )
    return parts


def _reason(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ELOOP or exc.errno == errno.ENOTDIR:
        return "it is a symbolic link or not a folder"
    if exc.errno == errno.ENOENT:
        return "it does not exist"
    if exc.errno == errno.ENXIO:
        return "it is a FIFO or device without another end, not a regular file"
    return os.strerror(exc.errno or 0) or type(exc).__name__
