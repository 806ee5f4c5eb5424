"""FSDP smoke test: every registered balancer x precision trains a few steps through Lightning's ``FSDPStrategy``.

Each cell fits a small ``MultiTaskModule`` (MLP backbone, ``--tasks`` multiclass tasks, the balancer with its
defaults, or in each of ``--modes``) for ``--steps`` steps with ``Trainer(accelerator="cuda", devices=1,
strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}), precision=...)``, then the same module, seed and batches
without FSDP (in ``32-true``), and prints one line: ``ok`` with the last step's loss and the largest relative
difference between the two runs' per-step training losses on the same batches (``Δ``: FSDP must train the
same model), or the exception's first line. A failing cell does not stop the others; a table of all
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


def trainer(device: str, precision: str, steps: int, fsdp: bool = True) -> L.Trainer:
    return L.Trainer(
        accelerator=device,
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}) if fsdp else "auto",
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run_cell(
    method: str, precision: str, tasks: int, steps: int, device: str = "cuda", mode: str | None = None
) -> str:
    """Fit one cell with FSDP and without; ``"ok (loss ..., Δ ...)"`` or the exception's first line. Never
    raises."""
    from lightning_mtl import MultiTaskModule, Task

    names = [f"t{i}" for i in range(tasks)]
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "x": torch.randn(32, 16, generator=g),
            **{n: torch.randint(0, CLASSES, (32,), generator=g) for n in names},
        }
        for _ in range(steps)
    ]

    class Losses(L.Callback):
        """The training loss of every step (the same batches: equal sequences mean equal training)."""

        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            self.values.append(float(trainer.callback_metrics["train/loss"]))

    def fitted(fsdp: bool) -> tuple[L.Trainer, list[float]]:
        torch.manual_seed(0)
        module = MultiTaskModule(
            nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()),
            [Task(n, kind="multiclass", labels=[str(c) for c in range(CLASSES)]) for n in names],
            balancer={"name": method, **({"mode": mode} if mode else {})},
            feature_dim=32,
            lr=1e-2,
        )
        losses = Losses()
        fit = trainer(device, precision, steps, fsdp)
        fit.callbacks.append(losses)
        fit.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
        return fit, losses.values

    try:
        fit, sharded = fitted(True)
        if fit.global_step != steps:
            return f"failed: stopped after {fit.global_step} of {steps} steps"
        if not sharded or not all(math.isfinite(v) for v in sharded):
            return f"failed: the training losses are {sharded}"
        if precision != "32-true":  # compared with the unsharded run in full precision only
            return f"ok (loss {sharded[-1]:.3f})"
        _, plain = fitted(False)
        delta = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(sharded, plain))
        return f"ok (loss {sharded[-1]:.3f}, Δ {delta:.1e})"
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
    parser.add_argument("--modes", nargs="+", choices=["params", "features"], help="gradient methods' modes")
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
    from lightning_mtl.balancing import create_balancer

    cells: dict[str, dict[str, str]] = {}
    for method in methods:
        balancer = create_balancer(method)
        supported = ("params", "features") if getattr(balancer, "supports_features", False) else ("params",)
        modes = [m for m in (args.modes or []) if m in supported] if balancer.family == "gradient" else []
        for mode in modes or [None]:
            row = f"{method} ({mode})" if mode else method
            for precision in args.precisions:
                start = time.perf_counter()
                shown = run_cell(method, precision, args.tasks, args.steps, args.device, mode)
                cells.setdefault(row, {})[precision] = shown
                print(f"{row} {precision}: {shown} [{time.perf_counter() - start:.1f} s]", flush=True)
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
