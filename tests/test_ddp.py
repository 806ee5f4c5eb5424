"""Two-process DDP on CPU (gloo): heterogeneous tasks, no unused-parameter errors, identical ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).parent / "helpers" / "ddp_two_tasks.py"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_ddp_two_heterogeneous_tasks(tmp_path, precision):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(tmp_path), precision],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    # DDP kept the replicas identical
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    # every rank logged the same epoch-end keys for both tasks, with the same synced values
    keys = set(ranks[0]["metrics"])
    assert keys == set(ranks[1]["metrics"])
    assert {
        "val/sentiment/accuracy",
        "val/topic/accuracy",
        "train/sentiment/auroc",
        "train/topic/macro_f1",
    } <= keys
    for key in (k for k in keys if k.startswith("val/")):
        assert ranks[0]["metrics"][key] == pytest.approx(ranks[1]["metrics"][key]), key
