"""The benchmark guard's verdicts (bench/smoke.py) and its bounds file: a ratio past its bound fails, a missing
figure fails, and every bounded figure is one a bench records."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def figure(name: str, ours: float, anchor: float) -> dict:
    return {"name": name, "ours": ours, "anchor": anchor, "unit": "ms", "ratio": ours / anchor}


def test_a_ratio_past_its_bound_or_a_missing_figure_fails_the_guard() -> None:
    smoke = load("smoke")
    bounds = {"a": {"bound": 2.0, "goal": 1.0}, "b": {"bound": 3.0, "goal": None}, "_about": "text"}
    rows, ok = smoke.verdicts([figure("a", 1.9, 1.0), figure("b", 2.0, 1.0)], bounds)
    assert ok and all(row.endswith("| ok |") for row in rows) and len(rows) == 2
    rows, ok = smoke.verdicts([figure("a", 2.1, 1.0), figure("b", 2.0, 1.0)], bounds)
    assert not ok and rows[0].endswith("| FAIL |")
    rows, ok = smoke.verdicts([figure("a", 1.0, 1.0)], bounds)
    assert not ok and rows[1].endswith("| MISSING |")


def test_every_bound_names_a_figure_a_bench_records(tmp_path: Path, monkeypatch) -> None:
    bounds = {k: v for k, v in json.loads((BENCH / "bounds.json").read_text()).items() if not k.startswith("_")}
    sources = "\n".join(p.read_text() for p in BENCH.glob("*.py"))
    recorded = set(re.findall(r'record\(f?"([^"]+)"', sources))
    patterns = [re.compile(re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(name)) + "$") for name in recorded]
    for name, bound in bounds.items():
        assert any(p.match(name) for p in patterns), f"{name}: no bench records it"
        assert bound["bound"] > 0 and (bound["goal"] is None or bound["goal"] < bound["bound"]), name
    figures = load("figures")
    monkeypatch.setenv(figures.FIGURES_ENV, str(tmp_path / "f.jsonl"))
    figures.record("x", 3.0, 2.0)
    assert json.loads((tmp_path / "f.jsonl").read_text()) == {"name": "x", "ours": 3.0, "anchor": 2.0, "unit": "ms",
                                                               "ratio": 1.5}
