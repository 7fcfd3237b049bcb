"""Modules of one idea: no module of the package is over 500 lines (issue 23)."""

from __future__ import annotations

from pathlib import Path

import cpa_scheduler

MAX_LINES = 500
PACKAGE = Path(cpa_scheduler.__file__).parent


def _too_long(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_bytes().splitlines())  # physical lines
        if lines > MAX_LINES:
            found.append(f"{path.relative_to(root.parent)}: {lines} lines")
    return found


def test_no_module_of_the_package_is_over_500_lines() -> None:
    too_long = _too_long(PACKAGE)
    assert not too_long, (
        f"Modules over {MAX_LINES} lines; split them along their seams: " + "; ".join(too_long)
    )


def test_an_overlong_module_is_named(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "short.py").write_text("x = 1\n" * MAX_LINES)
    (package / "sub" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert _too_long(package) == [f"pkg/sub/long.py: {MAX_LINES + 1} lines"]
