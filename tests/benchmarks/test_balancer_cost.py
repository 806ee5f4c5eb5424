"""Smoke test of ``benchmarks/balancer_cost.py``: a tiny in-process run gives a sane table."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

from lightning_mtl.balancing import list_balancers

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "balancer_cost.py"


@pytest.mark.slow
def test_balancer_cost_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    if "pcgrad" not in list_balancers():
        pytest.skip("pcgrad is not registered yet")
    bench = load_script(SCRIPT, register=True)
    args = ["--tasks", "2", "--steps", "1", "--warmup", "1", "--methods", "equal", "pcgrad", "--in-process"]
    rows = bench.main(args)
    table = capsys.readouterr().out

    results = {(r["job"]["method"], r["job"]["mode"]): r["result"] for r in rows}
    expected = [("plain", ""), ("floor", ""), ("equal", ""), ("pcgrad", "params"), ("pcgrad", "features")]
    assert set(expected) <= set(results)
    for key in expected:
        assert results[key]["ok"], results[key]
        assert results[key]["ms"] > 0
    cells = {
        (c[0], c[1]): c
        for c in (line.strip("|").split("|") for line in table.splitlines() if line.startswith("| "))
        for c in [[x.strip() for x in c]]
    }
    plain = results[("plain", "")]["ms"]
    for method, mode in expected:
        row = cells[(method, mode)]  # method, mode, ms, x plain, x equal, x floor, peak MiB, targets
        assert float(row[2]) > 0
        assert float(row[3].rstrip("x")) == pytest.approx(results[(method, mode)]["ms"] / plain, abs=0.01)
    assert cells[("plain", "")][3] == "1.00x"
    assert cells[("pcgrad", "params")][5].endswith("x")  # x floor, for the exact per-task method
    assert "## Targets" in table
