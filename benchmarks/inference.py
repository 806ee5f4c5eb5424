"""Inference cost of one multi-task model vs its single-task twins run one after another (CPU, same run).

The multi-task model is a zoo entry (or an artifact folder); the single-task twins are built from its
config: the same backbone architecture with one of its heads each (weights do not change the cost, so
they stay as initialised; a CNN twin of a classification task is built without the decoder it would
not use, as the vision recipe trains it). Two measurements per batch size, each timed for every variant in turn within
the same round (round-robin, so a busy machine slows all variants alike), reported as the median over
rounds:

* ``forward``: inputs already turned into tensors -> the raw head outputs of every task;
* ``predict``: raw inputs (table rows, texts) -> readable predictions of every task, i.e.
  ``backbone.preprocess`` + ``module.predict`` (for the twins: once per twin).

Latency is the median time of one call; throughput is examples per second at that batch size. The
default is one intra-op thread (``--threads``): on a machine shared with other jobs, more threads made the
batch-1024 forward of the clinical model 40x slower (they wait on busy cores).

    python benchmarks/inference.py                                     # clinical-risk-los, batch 1 and 1024
    python benchmarks/inference.py --batch-sizes 1 64 1024 --rounds 50 --json inference.json
    python benchmarks/inference.py --model nlp-sentiment-topic --batch-sizes 1 32 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_mtl import MultiTaskModule, zoo

TEXT = "A gripping, beautifully shot thriller whose second half loses its nerve and its plot."


def single_task_twins(model: MultiTaskModule) -> list[MultiTaskModule]:
    """One model per task: the multi-task model's backbone architecture and that task's head."""
    hp = model.hparams
    twins = []
    for task in hp["tasks"]:
        torch.manual_seed(0)
        backbone = dict(hp["backbone"])
        init = dict(backbone.get("init_args") or {})
        if init.get("decoder_channels") and task["kind"] != "dense":  # a classifier needs no decoder
            backbone["init_args"] = {**init, "decoder_channels": 0}
        twin = MultiTaskModule(
            backbone, [task], feature_dim=hp.get("feature_dim"), input_keys=hp.get("input_keys")
        )
        twins.append(twin.eval())
    return twins


def raw_inputs(model: MultiTaskModule, n: int) -> Any:
    """``n`` raw examples the model's backbone reads: SUPPORT2 records for a table model trained on its
    columns (else rows of unknown values), texts for a text encoder, Multi-Fashion test canvases for an
    image model (else random images), random features otherwise."""
    backbone = model.backbone
    pipeline = getattr(backbone, "pipeline", None)
    if pipeline is not None:
        import pandas as pd

        try:
            from lightning_mtl.data.support2 import support2

            frame = support2()
            if set(pipeline.columns) <= set(frame.columns):
                return frame.sample(n=n, replace=n > len(frame), random_state=0).reset_index(drop=True)
        except FileNotFoundError:
            pass
        return pd.DataFrame([dict.fromkeys(pipeline.columns)] * n)
    if callable(getattr(backbone, "preprocess", None)):
        return [TEXT] * n
    init = model.hparams["backbone"].get("init_args") or {}
    if isinstance(init.get("image_size"), list):  # an image model: Multi-Fashion test canvases if it is one
        size = init["image_size"]
        try:
            from lightning_mtl.data.multi_fashion import multi_fashion

            if init.get("in_channels", 1) == 1 and size[0] == size[1]:
                canvases = multi_fashion("test", size=size[0], limit=n)
                if len(canvases) == n:
                    return canvases[list(range(n))]["image"]
        except FileNotFoundError:
            pass
        return torch.rand(n, init.get("in_channels", 1), *size, generator=torch.Generator().manual_seed(0))
    width = init.get("in_features")
    if not isinstance(width, int):
        raise SystemExit(f"no example inputs for {type(backbone).__name__}; add a case to raw_inputs().")
    return torch.randn(n, width, generator=torch.Generator().manual_seed(0))


def tensors(model: MultiTaskModule, raw: Any) -> Any:
    preprocess = getattr(model.backbone, "preprocess", None)
    return preprocess(raw) if callable(preprocess) and not isinstance(raw, torch.Tensor) else raw


def predict(model: MultiTaskModule, raw: Any, batch: int) -> Any:
    return model.predict(tensors(model, raw), batch_size=batch)


def variants(
    model: MultiTaskModule, twins: list[MultiTaskModule], raw: Any, batch: int
) -> dict[str, Callable[[], Any]]:
    """The four timed calls: forward / predict, by the multi-task model or by every twin in turn."""
    inputs = tensors(model, raw)
    return {
        "forward/multi-task": lambda: model(inputs),
        "forward/single-task": lambda: [twin(inputs) for twin in twins],
        "predict/multi-task": lambda: predict(model, raw, batch),
        "predict/single-task": lambda: [predict(twin, raw, batch) for twin in twins],
    }


def measure(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every variant, round-robin over ``rounds`` (after ``warmup`` untimed rounds)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(warmup + rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


@torch.no_grad()
def run(model_ref: str, batch_sizes: list[int], rounds: int, warmup: int) -> dict[str, Any]:
    model = zoo.load(model_ref)
    twins = single_task_twins(model)
    rows = []
    for batch in batch_sizes:
        times = measure(variants(model, twins, raw_inputs(model, batch), batch), rounds, warmup)
        for what in ("forward", "predict"):
            mtl = statistics.median(times[f"{what}/multi-task"])
            stl = statistics.median(times[f"{what}/single-task"])
            rows.append(
                {
                    "measure": what,
                    "batch": batch,
                    "multi_task_ms": mtl * 1e3,
                    "single_task_ms": stl * 1e3,
                    "multi_task_per_s": batch / mtl,
                    "single_task_per_s": batch / stl,
                    "speedup": stl / mtl,
                }
            )
    return {
        "model": model_ref,
        "tasks": list(model.tasks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rounds": rounds,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    header = ["measure", "batch", "multi-task ms", f"{len(result['tasks'])} single-task ms", "speed-up",
              "multi-task ex/s", "single-task ex/s"]  # fmt: skip
    lines = [header]
    for r in result["rows"]:
        lines.append(
            [
                r["measure"],
                str(r["batch"]),
                f"{r['multi_task_ms']:.2f}",
                f"{r['single_task_ms']:.2f}",
                f"x{r['speedup']:.2f}",
                f"{r['multi_task_per_s']:,.0f}",
                f"{r['single_task_per_s']:,.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clinical-risk-los", help="a zoo name or an artifact folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 1024])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: a small model gains little from more, and on a busy "
        "machine they wait on each other)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.batch_sizes, args.rounds, args.warmup)
    print(
        f"{result['model']}: {len(result['tasks'])} tasks {result['tasks']}, {result['parameters']:,} parameters, "
        f"{result['threads']} thread(s), torch {result['torch']}, median of {result['rounds']} rounds\n"
    )
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
