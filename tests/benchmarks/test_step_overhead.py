"""``benchmarks/step_overhead.py``: its CLI gives the table, and every balancer's per-step host syncs and
dispatched ops stay within the targets against the plain LightningModule (counts, not times: deterministic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import load_script

from lightning_mtl.balancing import create_balancer, list_balancers

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_overhead.py"
# Tiny and cheap, with Lightning's logger flush in proportion: one flush in the 10 profiled steps. Steady
# state: past the batches whose label values the module checks (it reads them: check_inputs=True checks
# the first 10), and without the training metrics, which torchmetrics updates by boolean indexing on every
# train_metrics_every-th batch (their cost is documented, not part of the balancing step).
SMALL: dict[str, Any] = {
    "tasks": 4,
    "widths": (8, 16),
    "batch": 16,
    "steps": 10,
    "warmup": 11,
    "log_every_n_steps": 10,
    "timed": False,
    "train_metrics": False,
}
BALANCERS = [n for n in list_balancers() if not n.startswith("doc_")]


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_script(SCRIPT, register=True)


@pytest.fixture(scope="module")
def plain(bench: Any) -> dict[str, Any]:
    result = bench.measure("plain", **SMALL)
    assert result["sync"] >= 1  # the progress bar reads the logged loss every step: the profiler saw it
    assert result["aten_ops"] > 0
    return result  # type: ignore[no-any-return]


@pytest.mark.slow
def test_cli_smoke(bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tasks", "2", "--methods", "static", "pcgrad", "--steps", "2", "--warmup", "1"]
    args += [
        "--log-every-n-steps",
        "2",
        "--widths",
        "4",
        "8",
        "--batch",
        "4",
        "--json",
        str(tmp_path / "r.json"),
    ]
    rows = bench.main(args)
    out = capsys.readouterr().out

    assert [r["method"] for r in rows] == ["plain", "floor", "static", "pcgrad"]
    assert all(r["result"]["ok"] for r in rows), rows
    table = [
        [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")
    ]
    head, body = table[0], {r[0]: r for r in table[1:]}
    assert head[:8] == [
        "method",
        "mode",
        "sync/step",
        "of which nonzero",
        "aten ops/step",
        "x plain",
        "ms/step",
        "x plain",
    ]
    assert set(body) == {"plain", "floor", "static", "pcgrad"}
    assert body["plain"][5] == body["plain"][7] == "1.00x"
    assert float(body["floor"][4]) > float(body["plain"][4])  # T backward passes dispatch more ops than one
    assert body["pcgrad"][1].startswith("params")  # its default mode, shown
    assert "## Targets" in out
    assert (tmp_path / "r.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", BALANCERS)
def test_syncs_per_step_within_target(bench: Any, plain: dict[str, Any], name: str) -> None:
    """Loss weighting: no more host syncs per step than the plain module; gradient methods: at most two more
    (their weights, read once on the host, may cost one)."""
    result = bench.measure(name, **SMALL)
    slack = bench.GRADIENT_SYNC_SLACK if create_balancer(name).family == "gradient" else bench.LOSS_SYNC_SLACK
    assert result["sync"] <= plain["sync"] + slack, (
        f"{name}: {result['sync']:.1f} syncs/step (of which {result['nonzero']:.1f} nonzero) vs plain "
        f"{plain['sync']:.1f} + {slack}"
    )


@pytest.mark.slow
def test_static_dispatches_few_more_ops_than_plain(bench: Any, plain: dict[str, Any]) -> None:
    result = bench.measure("static", **SMALL)
    assert result["aten_ops"] <= bench.STATIC_ATEN_RATIO * plain["aten_ops"], (
        f"static: {result['aten_ops']:.0f} aten ops/step vs plain {plain['aten_ops']:.0f}"
    )
