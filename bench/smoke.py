"""The benchmark guard (make bench-smoke, run by .ci/run after the tests): the benches at a small size, each
figure's same-run ratio ours / anchor checked against bench/bounds.json; exit 1 when one passes its bound or a
bounded figure was not produced. The benches' own reports go to stderr, the verdict table to stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.figures import FIGURES_ENV  # noqa: E402

BOUNDS = BENCH / "bounds.json"
# Each bench at the size the guard needs: enough samples for a median, minutes in all.
RUNS = (
    ("convergence.py", "--reps", "10"),
    ("routes.py", "--reps", "1"),
    ("scale.py", "--sizes", "8"),
    ("cni_add.py", "--pods", "50"),
)


def run_benches(figures: Path) -> list[str]:
    """Run every bench; the names of those that failed."""
    failed = []
    for script, *args in RUNS:
        started = time.monotonic()
        print(f"== bench/{script} {' '.join(args)}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, str(BENCH / script), *args], stdout=sys.stderr,
                              env={**os.environ, FIGURES_ENV: str(figures)}, check=False)
        print(f"== bench/{script}: exit {done.returncode} after {time.monotonic() - started:.0f}s", file=sys.stderr)
        if done.returncode != 0:
            failed.append(script)
    return failed


def verdicts(figures: list[dict], bounds: dict[str, dict]) -> tuple[list[str], bool]:
    """The verdict table's rows and whether every bounded figure is within its bound."""
    by_name = {f["name"]: f for f in figures}
    rows, ok = [], True
    for name, bound in bounds.items():
        if name.startswith("_"):
            continue
        figure = by_name.get(name)
        if figure is None or figure["ratio"] is None:
            rows.append(f"| {name} | - | - | - | {bound['bound']:g}x | MISSING |")
            ok = False
            continue
        within = figure["ratio"] <= bound["bound"]
        ok &= within
        goal = f"{bound['goal']:g}x" if bound.get("goal") else "-"
        rows.append(f"| {name} | {figure['ours']:.1f} {figure['unit']} | {figure['anchor']:.1f} {figure['unit']} | "
                    f"{figure['ratio']:.2f}x | {bound['bound']:g}x (goal {goal}) | {'ok' if within else 'FAIL'} |")
    return rows, ok


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("bench-smoke: run as root (the benches deploy labs in network namespaces)")
    bounds = json.loads(BOUNDS.read_text())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="calico-py-smoke-") as work:
        figures_file = Path(work) / "figures.jsonl"
        figures_file.touch()
        failed = run_benches(figures_file)
        figures = [json.loads(line) for line in figures_file.read_text().splitlines() if line.strip()]
    rows, ok = verdicts(figures, bounds)
    print(f"## Benchmark guard ({len(figures)} figures in {time.monotonic() - started:.0f} s)\n")
    print("| figure | ours | anchor | ratio | bound | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    if failed:
        print(f"\nbenches that failed: {', '.join(failed)}")
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
