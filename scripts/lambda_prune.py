"""Remove distributions a Lambda function never imports from its artifact.

Usage: python scripts/lambda_prune.py ARTIFACT_DIR DIST [DIST ...]

Deletes every file the named distributions installed (their dist-info RECORD), and refuses
(exit 1, nothing deleted) when a distribution that stays requires one of them, so a pruned
artifact cannot miss a dependency of what it keeps. The Makefile's build-DispatcherFunction
uses it: the dispatcher imports neither the web framework nor token verification nor the
Supabase client.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dists(root: Path) -> dict[str, Path]:
    out = {}
    for info in root.glob("*.dist-info"):
        name = info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        out[_norm(name)] = info
    return out


def _requires(info: Path) -> set[str]:
    needed = set()
    meta = (info / "METADATA").read_text(errors="replace")
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.removeprefix("Requires-Dist:").strip()
        if "extra ==" in spec:  # an optional extra is not installed unless named
            continue
        match = re.match(r"[A-Za-z0-9_.\-]+", spec)
        if match:
            needed.add(_norm(match.group()))
    return needed


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(sys.argv[1])
    drop = {_norm(n) for n in sys.argv[2:]}
    dists = _dists(root)
    missing = drop - dists.keys()
    if missing:
        print(f"lambda_prune: not installed in {root}: {sorted(missing)}", file=sys.stderr)
        return 1
    # Our own distribution requires what either function needs; it is the one not checked.
    kept = {name: info for name, info in dists.items() if name not in drop | {"cpa_scheduler"}}
    broken = {name: sorted(_requires(info) & drop) for name, info in kept.items()}
    broken = {name: needs for name, needs in broken.items() if needs}
    if broken:
        print(f"lambda_prune: kept distributions need dropped ones: {broken}", file=sys.stderr)
        return 1
    freed = 0
    for name in sorted(drop):
        info = dists[name]
        for line in (info / "RECORD").read_text().splitlines():
            path = root / line.split(",", 1)[0]
            if path.is_file():
                freed += path.stat().st_size
                path.unlink()
        shutil.rmtree(info, ignore_errors=True)
    for folder in sorted(root.rglob("*"), reverse=True):  # the folders they leave empty
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    print(f"lambda_prune: removed {len(drop)} distributions, {freed / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
