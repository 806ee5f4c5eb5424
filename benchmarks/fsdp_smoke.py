"""FSDP smoke test: every registered balancer x precision trains a few steps through Lightning's ``FSDPStrategy``.

Each cell fits a small ``MultiTaskModule`` (MLP backbone, ``--tasks`` multiclass tasks, the balancer with its
defaults) for ``--steps`` steps with ``Trainer(accelerator="cuda", devices=1,
strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}), precision=...)`` and prints one line: ``ok`` with the
last logged loss, or the exception's first line. A failing cell does not stop the others; a table of all
cells comes last. Lightning refuses FSDP without a GPU, so ``--device cpu`` only prints that and exits.

Commands::

    python benchmarks/fsdp_smoke.py                                   # every balancer x 32-true, bf16-mixed
    python benchmarks/fsdp_smoke.py --methods 'pc*' static --precisions bf16-mixed --json fsdp.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

CLASSES = 5


def trainer(device: str, precision: str, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator=device,
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}),
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run_cell(method: str, precision: str, tasks: int, steps: int, device: str = "cuda") -> str:
    """Fit one cell; ``"ok (loss ...)"`` or the exception's first line. Never raises."""
    from lightning_mtl import MultiTaskModule, Task

    try:
        torch.manual_seed(0)
        names = [f"t{i}" for i in range(tasks)]
        module = MultiTaskModule(
            nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()),
            [Task(n, kind="multiclass", labels=[str(c) for c in range(CLASSES)]) for n in names],
            balancer=method,
            feature_dim=32,
        )
        g = torch.Generator().manual_seed(0)
        batches = [
            {
                "x": torch.randn(32, 16, generator=g),
                **{n: torch.randint(0, CLASSES, (32,), generator=g) for n in names},
            }
            for _ in range(steps)
        ]
        fit = trainer(device, precision, steps)
        fit.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
        loss = fit.callback_metrics.get("train/loss")
        if fit.global_step != steps:
            return f"failed: stopped after {fit.global_step} of {steps} steps"
        if loss is None or not math.isfinite(float(loss)):
            return f"failed: the logged train/loss is {loss}"
        return f"ok (loss {float(loss):.3f})"
    except Exception as err:  # one line per cell, whatever failed
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]


def main(argv: list[str] | None = None) -> dict[str, dict[str, str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--methods", nargs="+", default=["*"], help="fnmatch patterns over the balancers")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        trainer(args.device, args.precisions[0], args.steps)
    except Exception as err:  # Lightning's refusal (no GPU, no CUDA accelerator, FSDP unavailable)
        print(f"skip: FSDP cannot run here ({str(err).splitlines()[0]})")
        return {}
    from lightning_mtl.balancing import list_balancers

    methods = [
        m
        for m in list_balancers()
        if not m.startswith("doc_") and any(fnmatch.fnmatch(m, p) for p in args.methods)
    ]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"# FSDP smoke: {len(methods)} balancers x {args.precisions}, {args.tasks} tasks, {args.steps} steps, {gpu}"
    )
    cells: dict[str, dict[str, str]] = {}
    for method in methods:
        for precision in args.precisions:
            start = time.perf_counter()
            shown = run_cell(method, precision, args.tasks, args.steps, args.device)
            cells.setdefault(method, {})[precision] = shown
            print(f"{method} {precision}: {shown} [{time.perf_counter() - start:.1f} s]", flush=True)
    print("\n| balancer | " + " | ".join(args.precisions) + " |\n|---|" + "---|" * len(args.precisions))
    for method, row in cells.items():
        print(f"| {method} | " + " | ".join(row[p] for p in args.precisions) + " |")
    failed = sum(not v.startswith("ok") for row in cells.values() for v in row.values())
    print(f"\n{sum(len(r) for r in cells.values()) - failed} ok, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": str(torch.__version__), "cells": cells}, f, indent=1)
    return cells


if __name__ == "__main__":
    sys.exit(1 if any(not v.startswith("ok") for row in main().values() for v in row.values()) else 0)
