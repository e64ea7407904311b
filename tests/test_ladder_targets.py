"""benchmarks/ladder_targets.py judges issue 25's targets from the committed CPU ladders'
fits.json files; the committed README's target table must be exactly what it prints, and
its verdicts must follow from the committed results.csv."""

import csv
import json
from pathlib import Path

import pytest

from benchmarks import ladder_targets

RES = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MAIN, ISO = RES / "ladder_cpu", RES / "ladder_cpu_isoflop"


def _rows(path):
    with open(path / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_readme_target_table_is_the_scripts_output(tmp_path, capsys):
    assert ladder_targets.main([str(MAIN), str(ISO), "--out", str(tmp_path / "t.json")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 6
    readme = (MAIN / "README.md").read_text()
    for line in table[2:]:
        assert line in readme, line
    t = json.loads((tmp_path / "t.json").read_text())
    assert sorted(t) == list("abcdef")


def test_verdicts_follow_from_the_results_table():
    f = ladder_targets.read_fits(MAIN)
    rows = [r for r in _rows(MAIN) if r["group"] == "grid"]
    # a: recomputed from results.csv
    by: dict = {}
    for r in rows:
        by.setdefault(r["sparsity"], []).append((float(r["params_active"]),
                                                 float(r["final_eval_loss"])))
    mono = all(all(b[1] < a[1] for a, b in zip(sorted(v), sorted(v)[1:])) for v in by.values())
    assert ladder_targets.target_a(f)["met"] == mono
    # b: the paired differences are the seed runs' own differences
    seeds = [r for r in _rows(MAIN) if r["group"] == "seed"]
    loss = {(r["repeat_of"] or r["name"], int(r["seed"])): float(r["final_eval_loss"])
            for r in rows + seeds}
    for g in ladder_targets.target_b(f)["gaps"]:
        frm, to = g["from"], g["to"]
        ks = sorted(s for (n, s) in loss if n == frm)
        diffs = [loss[(to, s)] - loss[(frm, s)] for s in ks]
        assert g["n"] == len(ks) >= 3
        assert g["mean"] == pytest.approx(sum(diffs) / len(diffs))
        assert g["met"] == (g["mean"] < 0 and g["p"] < 0.05)
    # f: three seeds per balancing variant, in runs of their own
    cmp_rows = [r for r in _rows(MAIN) if r["group"] == "compare"]
    assert len(cmp_rows) >= 6
    assert not {int(r["seed"]) for r in cmp_rows} & {int(r["seed"]) for r in rows + seeds}
