"""Every balancer's training step on a GPU under ``torch.cuda.set_sync_debug_mode("warn")``: PyTorch itself
reports each operation that synchronises the host with the device (``.item()``, a device->host copy,
``nonzero``...). Prints one line per balancer (and mode) with the number of synchronisations in the steady
steps and where they came from; exit status 1 if any method other than Aligned-MTL (one ``eigh`` check per
step, documented) synchronises.

Each row: a ``MultiTaskModule`` (MLP backbone, ``--tasks`` tasks of every tabular kind with missing labels,
``train_metrics=False``) on ``cuda``; the first batches (whose label values ``check_inputs`` reads on purpose)
run outside the check, then ``--steps`` steps of ``training_step`` + ``backward`` + ``AdamW.step`` (foreach,
its step counters on the host) run inside it. No ``Trainer``: Lightning's progress bar reads the logged loss
on every refresh, which is its cost, not the step's (``TQDMProgressBar(refresh_rate=N)`` spaces it out).

Command::

    python benchmarks/cuda_sync_check.py --steps 3
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings

import torch

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import MLPBackbone

DEVICE = "cuda"
ALLOWED = {"aligned_mtl": 1}  # per step: torch.linalg.eigh checks its error code on the host


def batch(n: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    out = {
        "x": x,
        "risk": (x[:, 0] > 0).float(),
        "group": x[:, 1:4].argmax(1),
        "flags": (x[:, 4:6] > 0).float(),
        "stay": x[:, 6] * 2,
    }
    out["risk"][0] = float("nan")
    out["group"][1] = -100
    out["flags"][2, 1] = float("nan")
    out["stay"][n // 2 :] = float("nan")
    return {k: v.to(device) for k, v in out.items()}


TASKS = [
    Task("risk", kind="binary", labels=["low", "high"]),
    Task("group", kind="multiclass", labels=["a", "b", "c"]),
    Task("flags", kind="multilabel", labels=["f0", "f1"]),
    Task("stay", kind="regression"),
]


def check(name: str, mode: str | None, steps: int) -> tuple[int, collections.Counter[str]]:
    torch.manual_seed(0)
    balancer = {"name": name, **({"mode": mode} if mode else {})}
    module = MultiTaskModule(
        MLPBackbone(16, hidden=(64, 32), dropout=0.0), TASKS, balancer=balancer, train_metrics=False
    ).to(DEVICE)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=True)
    data = batch(64, DEVICE)

    def step(i: int) -> None:
        loss = module.training_step(data, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(module.check_batches + 1):  # the label-value checks read the device on purpose
        step(i)
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                step(module.check_batches + 1 + i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    for w in syncs:
        sites[f"{w.filename.split('/')[-1]}:{w.lineno}"] += 1
    return len(syncs), sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return 0
    from lightning_mtl.balancing import create_balancer, list_balancers

    print(
        f"# CUDA sync check on {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} steps"
    )
    print("| balancer | mode | synchronisations per step | where |\n|---|---|---|---|")
    bad = 0
    for name in [n for n in list_balancers() if not n.startswith("doc_")]:
        b = create_balancer(name)
        modes = [None]
        if b.family == "gradient":
            modes = ["params", "features"] if getattr(b, "supports_features", False) else ["params"]
        for mode in modes:
            try:
                count, sites = check(name, mode, args.steps)
                per = count / args.steps
                where = ", ".join(f"{k} x{v}" for k, v in sites.most_common(4))
                bad += per > ALLOWED.get(name, 0)
                print(f"| {name} | {mode or ''} | {per:.1f} | {where} |", flush=True)
            except Exception as err:  # one row per method, whatever failed
                bad += 1
                line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
                print(f"| {name} | {mode or ''} | failed | {line} |", flush=True)
                traceback.print_exc(file=sys.stderr)
    print(f"\n{bad} method(s) over their allowance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
