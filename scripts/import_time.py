"""Cold import of the Lambda handlers from a built artifact, as a ratio to bare FastAPI + Mangum.

Usage: python scripts/import_time.py ARTIFACT_DIR [--runs N]

Each figure runs in a fresh ``python -I -S`` whose only path entry is the artifact (what Lambda
has), alternating the handler and the baseline so machine noise hits both alike; the medians
and their ratio are printed. Goal (issue "Deployable as built"): ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

# Wall time and the process's CPU time: on a busy machine the CPU time is the steadier figure.
PROBE = (
    "import sys, time; sys.path.insert(0, {path!r}); t = time.perf_counter(); "
    "c = time.process_time(); {stmt}; "
    "print(time.perf_counter() - t, time.process_time() - c)"
)
FIGURES = {
    "baseline": "import fastapi, mangum",
    "api handler": "import functions.api",
    "dispatcher handler": "import functions.dispatcher",
}


def measure(artifact: str, stmt: str) -> tuple[float, float]:
    python = getattr(sys, "_base_executable", sys.executable)
    code = PROBE.format(path=artifact, stmt=stmt)
    done = subprocess.run(
        [python, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    wall, cpu = done.stdout.split()
    return float(wall), float(cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    wall: dict[str, list[float]] = {name: [] for name in FIGURES}
    cpu: dict[str, list[float]] = {name: [] for name in FIGURES}
    for _ in range(args.runs):
        for name, stmt in FIGURES.items():
            w, c = measure(args.artifact, stmt)
            wall[name].append(w)
            cpu[name].append(c)
    for label, samples in (("wall", wall), ("cpu", cpu)):
        base = statistics.median(samples["baseline"])
        for name, values in samples.items():
            median = statistics.median(values)
            print(f"{label:4} {name:20} median {median * 1000:7.1f} ms  ratio {median / base:4.2f}  "
                  f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f}, n={len(values)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
