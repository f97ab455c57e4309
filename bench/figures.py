"""Figures a benchmark hands to the guard (bench/smoke.py): when ``CALICO_PY_BENCH_FIGURES`` names a file, each
:func:`record` appends one JSON line to it; otherwise it does nothing, so a bench run by hand is unchanged."""

from __future__ import annotations

import json
import os

FIGURES_ENV = "CALICO_PY_BENCH_FIGURES"


def record(name: str, ours: float, anchor: float | None = None, unit: str = "ms") -> None:
    """One figure: ours, and the anchor's from the same run when there is one (the guard bounds the ratio)."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    entry = {"name": name, "ours": ours, "anchor": anchor, "unit": unit,
             "ratio": ours / anchor if anchor else None}
    with open(path, "a") as out:
        out.write(json.dumps(entry) + "\n")
