"""Recipe: Multi-Fashion — from one 28x28 canvas holding two Fashion-MNIST items, one small CNN predicts
the class of the top-left item, the class of the bottom-right item and a per-pixel map of which item
(or background) each pixel shows; next to a single-task model per task, over several seeds.

Runs offline with no arguments: the images ship in the Debian package ``dataset-fashion-mnist``
(``apt-get update && apt-get install -y dataset-fashion-mnist``); the canvases are composed once and
cached (:mod:`lightning_mtl.data.multi_fashion`).

    python recipes/vision_multi_fashion.py                           # 3 seeds, ~6 min on 2 CPU cores
    python recipes/vision_multi_fashion.py --fast                    # a smoke run on a small slice
    python recipes/vision_multi_fashion.py --seeds [0] --trainer.max_epochs 5 --data.train_size 50000
    python recipes/vision_multi_fashion.py --model.balancer '{"name": "famo"}' --model.widths [32,64,128]
    python recipes/vision_multi_fashion.py --help

Data (Sener & Koltun 2018; Lin et al. 2019): the top-left item at canvas rows/columns 0-27 of 36x36,
the bottom-right item at 6-33, the brighter pixel kept where they overlap, resized to 28x28
(nearest). Train canvases come from Fashion-MNIST's training images, test canvases from its 10,000
``t10k`` images, both composed with ``--data.compose_seed`` (fixed, so every seed is scored on the
same 10,000 test canvases). For each seed, ``--data.val_size`` canvases of the training pool are held
out for model selection and ``--data.train_size`` others train (a subset of the 60,000, for time).

Models, for each seed and on the same split:

* (a) the multi-task model: one :class:`~lightning_mtl.backbones.CNNEncoder` (a small ResNet-style
  encoder with a light top-down decoder) shared by a linear head per classification task on the
  pooled features and a conv head on the decoder's full-resolution map for ``segmentation``;
* (b) one single-task model per task: the same backbone and training (the classification ones
  without the decoder, which they would not use).

Model selection uses the validation canvases only: each model keeps the weights of its validation
check with the lowest validation loss (summed over its tasks); the test canvases are scored once. Test
metrics: accuracy (and macro-F1 in ``results.json``) for the two classification tasks, mean IoU over
the three pixel classes and pixel accuracy for the segmentation; the table shows mean ± std over the
seeds and the paired multi-task minus single-task difference.

Δm% (multi-task vs single-task, per seed, then mean ± std): the LibMTL definition, the mean over tasks
of each task's mean relative change over its metrics (accuracy; mIoU and pixel accuracy), positive
when the multi-task model is better, ``Δm = 1/T Σ_t 1/|M_t| Σ_m (M_mtl - M_stl) / M_stl * 100``
(every metric here is higher-is-better). The flat mean over all four metrics (Nash-MTL / FAMO
weighting; they report it with the opposite sign) is given beside it.

Why these defaults (2 CPU cores, a 10-minute budget for twelve fits: 3 seeds x 4 models): each fit
runs single-threaded and one worker process per core runs them side by side (``--workers``,
``--threads``): convolutions this small gain little from intra-op threads, and on a busy machine
OpenMP threads that wait for each other at every op make them several times slower. Each model sees
12,000 training canvases for 2 epochs (a fifth of the 60,000; ``--data.train_size``,
``--trainer.max_epochs``). The encoder has 16/32/64 channels and one residual block per stage, in
the channels-last layout; its classification features are the last stage pooled over a 2x2 grid
(``--model.pool_size``), because "the item at the top left" is about place, which a global average
throws away (measured on one seed: +4.6 and +5.0 points of accuracy for the multi-task model, +2.4
and +1.9 for the single-task ones). A small CNN rather than a ``transformers`` vision backbone built
from a config: offline there are no pretrained vision weights to start from, and on 28x28 grey images
trained from scratch on CPU a CNN's locality and translation bias learns far more per second than a
ViT's patches.

Writes ``<output_dir>/results.json`` (every seed's metrics, the summary, Δm%, timings),
``<output_dir>/model.ckpt`` and ``config.yaml``, and exports the multi-task model of the first seed as
the zoo entry ``<zoo_dir>/vision-multi-fashion`` (by default into the checkout's ``zoo/``), whose card
carries the measured numbers and the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import CNNEncoder
from lightning_mtl.callbacks import BestValidation
from lightning_mtl.data.multi_fashion import (
    FASHION_LABELS,
    SEGMENT_LABELS,
    MultiFashion,
    keep_batch,
    multi_fashion,
)
from lightning_mtl.evaluation import delta_m, delta_m_line, format_table, mean_std, per_task
from lightning_mtl.runs import command_line, expand_fast, quiet_lightning

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
ENTRY = "vision-multi-fashion"
COMMAND = "python recipes/vision_multi_fashion.py"

TASK_NAMES = ["top_left", "bottom_right", "segmentation"]
# Test metrics compared across models and in Δm% (all higher-is-better).
METRICS = {
    "top_left": ["accuracy"],
    "bottom_right": ["accuracy"],
    "segmentation": ["miou", "pixel_accuracy"],
}
MODELS = ("multi-task", "single-task")

CARD = {
    "name": ENTRY,
    "description": "Multi-Fashion (two Fashion-MNIST items on one 28x28 canvas): the class of the top-left "
    "item, the class of the bottom-right item and a per-pixel map (background / top-left / bottom-right) "
    "from one small ResNet-style CNN.",
    "license": "mit",
    "datasets": ["Fashion-MNIST (Xiao et al. 2017, MIT), via the Debian package dataset-fashion-mnist"],
    "intended_use": "Teaching and benchmarking multi-task learning on images with classification and dense "
    "tasks. Pass grey images as a float tensor [batch, 1, 28, 28] with values in [0, 1], light items on a "
    "black background as in Fashion-MNIST (the command line reads .png files in mode L, resized to 28x28): "
    "`predict` returns both item classes with label names and probabilities, and a 28x28 class map.",
    "limitations": "Trained only on synthetic Multi-Fashion canvases (two centred 28x28 Zalando product "
    "thumbnails overlapping at fixed places, then resized); it knows nothing of photos, other layouts, one "
    "or three items, or dark-on-light images. The segmentation follows the composition rule (the brighter "
    "item owns an overlapping pixel; any non-zero intensity is an item).",
    "tags": ["image-classification", "image-segmentation", "multi-task", "fashion-mnist", "multi-fashion"],
    "language": [],
}

# `--fast`: a smoke run on a small slice (CI runs it); flags given after it still win.
FAST_ARGS = [
    "--seeds=[0]",
    "--data.train_size=384",
    "--data.val_size=128",
    "--data.test_size=256",
    "--data.batch_size=64",
    "--trainer.max_epochs=1",
    "--workers=1",
    "--threads=1",
]


def make_tasks(names: Sequence[str], dense_hidden: int = 16) -> list[Task]:
    """The recipe's tasks (any subset of :data:`TASK_NAMES`, in that order)."""
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise ValueError(f"tasks must be a non-empty subset of {TASK_NAMES}, got {list(names)}.")
    every = {
        "top_left": Task("top_left", kind="multiclass", labels=FASHION_LABELS),
        "bottom_right": Task("bottom_right", kind="multiclass", labels=FASHION_LABELS),
        "segmentation": Task(
            "segmentation", kind="dense", labels=SEGMENT_LABELS, head_kwargs={"hidden": dense_hidden}
        ),
    }
    return [every[n] for n in TASK_NAMES if n in names]


class MultiFashionModule(MultiTaskModule):
    """The recipe's model: a :class:`CNNEncoder` shared by the heads of ``tasks`` (default: all three).

    The decoder is built only when a dense task is among ``tasks``. The checkpoint stores the generic
    specs, so it reloads with ``MultiTaskModule.load_from_checkpoint(path)`` (no recipe import needed).
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        widths: list[int] | None = None,
        blocks: int = 1,
        decoder_channels: int = 16,
        pool_size: int = 2,
        dense_hidden: int = 16,
        image_size: int = 28,
        balancer: dict[str, Any] | str = "static",
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        scheduler: str | None = "cosine",
        warmup_ratio: float = 0.05,
    ) -> None:
        task_list = make_tasks(tasks or TASK_NAMES, dense_hidden)
        dense = any(t.kind == "dense" for t in task_list)
        super().__init__(
            CNNEncoder(
                in_channels=1,
                widths=widths or [16, 32, 64],
                blocks=blocks,
                decoder_channels=decoder_channels if dense else 0,
                pool_size=pool_size,
                image_size=[image_size, image_size],
            ),
            task_list,
            balancer=balancer,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            warmup_ratio=warmup_ratio,
        )
        self.to(memory_format=self.backbone.memory_format)  # the heads' convolutions too (see CNNEncoder)


class MultiFashionData(L.LightningDataModule):
    """Multi-Fashion canvases: ``val_size`` + ``train_size`` from the training pool (composed from
    Fashion-MNIST's training images), split at random with ``seed``; ``test_size`` test canvases
    (``None``: all 10,000, composed from ``t10k``). ``compose_seed`` fixes the pairing of both.

    ``image_size``: 28 (the papers' resize) or up to 36 (unresized canvas). ``cache_dir``: where the
    composed canvases are cached (default ``~/.cache/lightning_mtl/multi_fashion``); ``root``: a folder
    with the Fashion-MNIST IDX files instead of the Debian package's.
    """

    def __init__(
        self,
        seed: int = 0,
        compose_seed: int = 0,
        train_size: int = 12000,
        val_size: int = 2000,
        test_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        image_size: int = 28,
        cache_dir: str | None = None,
        root: str | None = None,
    ) -> None:
        super().__init__()
        if train_size < 1 or val_size < 1:
            raise ValueError(f"train_size and val_size must be positive, got {train_size} and {val_size}.")
        self.seed, self.compose_seed = seed, compose_seed
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.image_size, self.cache_dir, self.root = image_size, cache_dir, root
        self.datasets: dict[str, MultiFashion] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        kwargs: dict[str, Any] = {"size": self.image_size, "cache_dir": self.cache_dir, "root": self.root}
        pool = multi_fashion("train", self.compose_seed, limit=self.val_size + self.train_size, **kwargs)
        if len(pool) < self.val_size + self.train_size:
            raise ValueError(
                f"train_size + val_size = {self.train_size + self.val_size} exceeds the {len(pool)} training canvases."
            )
        order = np.random.default_rng(self.seed).permutation(len(pool))
        self.datasets = {
            "train": pool.select(order[self.val_size :]),
            "val": pool.select(order[: self.val_size]),
            "test": multi_fashion("test", self.compose_seed, limit=self.test_size, **kwargs),
        }

    def sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v) for k, v in self.datasets.items()}

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        train = split == "train"
        # Whole batches are sliced from the in-memory tensors (MultiFashion.__getitems__), no per-example
        # collation; an ordinary loader otherwise, so that Lightning can shard it under DDP.
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            collate_fn=keep_batch,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class RecipeCLI(LightningCLI):
    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--seeds", type=list[int], default=[0, 1, 2], help="One run per seed.")
        parser.add_argument(
            "--output_dir", type=str, default="outputs/vision_multi_fashion", help="Where the results go."
        )
        parser.add_argument(
            "--zoo_dir", type=str, default=str(ZOO_DIR), help="Where the zoo entry is exported ('' to skip)."
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=0,
            help="Processes that run the fits in parallel (0: one per CPU core; 1: in this process).",
        )
        parser.add_argument(
            "--threads",
            type=int,
            default=0,
            help="torch threads per process (0: 1 with several workers, else one per CPU core).",
        )
        parser.add_lightning_class_args(BestValidation, "validation")
        parser.set_defaults({"validation.patience": 4})
        parser.link_arguments("seeds", "data.seed", compute_fn=lambda seeds: seeds[0])
        parser.link_arguments("data.image_size", "model.image_size")


# --- evaluation -------------------------------------------------------------------------------------
def higher_is_better(names: Sequence[str]) -> dict[str, dict[str, bool]]:
    """The metrics compared in Δm% (:data:`METRICS`, all higher-is-better)."""
    return {name: dict.fromkeys(METRICS[name], True) for name in names}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every (model, task, metric), the paired differences, and Δm%."""
    summary: dict[str, Any] = {m: {} for m in MODELS}
    for model in MODELS:
        for name, metrics in runs[0]["test"][model].items():
            summary[model][name] = {m: mean_std([r["test"][model][name][m] for r in runs]) for m in metrics}
    paired = {
        name: {
            m: mean_std([r["test"]["multi-task"][name][m] - r["test"]["single-task"][name][m] for r in runs])
            for m in METRICS[name]
        }
        for name in runs[0]["test"]["multi-task"]
    }
    deltas = [r["delta_m"] for r in runs]
    return {
        "test": summary,
        "multi_task_minus_single_task": paired,
        "delta_m_percent": {k: mean_std([d[k] for d in deltas]) for k in deltas[0]},
    }


def results_table(summary: Mapping[str, Any]) -> str:
    """Task x metric rows; multi-task and single-task columns (mean ± std over seeds) and their difference."""
    header = ["task", "metric", *MODELS, "MTL - STL"]
    rows = [header]
    for name, metrics in summary["multi_task_minus_single_task"].items():
        for metric, d in metrics.items():
            cells = [name, metric]
            for model in MODELS:
                v = summary["test"][model][name][metric]
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}")
            cells.append(f"{d['mean']:+.4f} ± {d['std']:.4f}")
            rows.append(cells)
    return format_table(rows) + "\n\n" + delta_m_line(summary["delta_m_percent"])


# --- the run ----------------------------------------------------------------------------------------
def build_cli(argv: list[str]) -> RecipeCLI:
    """Parse the recipe's arguments (after ``--fast`` expansion) into a ``RecipeCLI`` (nothing runs)."""
    return RecipeCLI(
        MultiFashionModule,
        MultiFashionData,
        run=False,
        args=argv,
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": 2,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
        save_config_callback=None,
    )


def train(
    cli: RecipeCLI, data: MultiFashionData, tasks: list[str], seed: int
) -> tuple[MultiFashionModule, L.Trainer, dict[str, Any]]:
    """Train one model on ``tasks`` with the CLI's model and trainer settings (best validation check
    kept), then score it once on the test canvases."""
    L.seed_everything(seed, verbose=False)
    model_args = cli.config["model"].as_dict()
    model_args["tasks"] = tasks
    model = MultiFashionModule(**model_args)
    trainer = cli.instantiate_trainer()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    best = next(c for c in trainer.callbacks if isinstance(c, BestValidation))  # type: ignore[attr-defined]
    start = time.perf_counter()
    tested = trainer.test(model, datamodule=data, verbose=False)
    info = {
        "test": per_task(tested[0] if tested else {}, "test"),
        "fit_seconds": round(fit_seconds, 2),
        "test_seconds": round(time.perf_counter() - start, 2),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "best_check": best.best_check,
        "val_loss": best.best_score,
    }
    return model, trainer, info


# One parsed CLI and one data module per seed in each process (the main one, or a worker).
_STATE: dict[str, Any] = {"cli": None, "argv": None, "data": {}}


def _process_cli(argv: list[str]) -> RecipeCLI:
    if _STATE["argv"] != argv:
        _STATE.update(cli=build_cli(argv), argv=list(argv), data={})
    return cast(RecipeCLI, _STATE["cli"])


def _data(cli: RecipeCLI, seed: int) -> MultiFashionData:
    if seed not in _STATE["data"]:
        args = cli.config["data"].as_dict()
        _STATE["data"][seed] = (
            cli.datamodule if args["seed"] == seed else MultiFashionData(**{**args, "seed": seed})
        )
    return cast(MultiFashionData, _STATE["data"][seed])


def fit_job(argv: list[str], seed: int, tasks: list[str], checkpoint: str | None = None) -> dict[str, Any]:
    """One model (``tasks``) on one seed's split: its test metrics and timings. Runs in the main process
    or in a worker (which parses ``argv`` once). ``checkpoint``: where to save the trained model."""
    cli = _process_cli(argv)
    data = _data(cli, seed)
    _, trainer, info = train(cli, data, tasks, seed)
    if checkpoint:
        trainer.save_checkpoint(checkpoint, weights_only=True)  # the best validation check's weights
    info.update(seed=seed, tasks=tasks, sizes=data.sizes(), pid=os.getpid())
    return info


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_lightning()


def run_jobs(argv: list[str], jobs: list[dict[str, Any]], workers: int, threads: int) -> list[dict[str, Any]]:
    """Run every fit, in this process (``workers=1``) or spread over ``workers`` processes of
    ``threads`` torch threads each; print one line per finished fit; return the results in job order."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)

    def report(i: int, info: dict[str, Any]) -> None:
        results[i] = info
        if not _global_zero():
            return
        kind = "multi-task" if len(info["tasks"]) > 1 else f"single-task {info['tasks'][0]}"
        print(
            f"seed {info['seed']} {kind}: {_brief(info['test'])} ({info['fit_seconds']:.0f} s fit)",
            flush=True,
        )

    if workers <= 1:
        for i, job in enumerate(jobs):
            report(i, fit_job(argv, **job))
        return cast(list[dict[str, Any]], results)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with _importable_by_workers():
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
        with pool:
            futures = {pool.submit(fit_job, argv, **job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                report(futures[future], future.result())
    return cast(list[dict[str, Any]], results)


@contextlib.contextmanager
def _importable_by_workers() -> Iterator[None]:
    """Spawned workers find ``fit_job`` by module name. Run as a script, that is ``__main__`` (which
    multiprocessing re-imports from the path); loaded by path under another name (as the tests do),
    the name must resolve to these very functions here and to this file in the workers."""
    if __name__ == "__main__":
        yield
        return
    saved, folder = sys.modules.get(__name__), str(Path(__file__).resolve().parent)
    proxy = types.ModuleType(__name__)
    proxy.__dict__.update(globals())
    sys.modules[__name__] = proxy
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        if saved is None:
            del sys.modules[__name__]
        else:
            sys.modules[__name__] = saved


def _global_zero() -> bool:
    return int(getattr(rank_zero_only, "rank", 0)) == 0


def _brief(results: Mapping[str, Mapping[str, float]]) -> str:
    return ", ".join(f"{n}/{m} {v[m]:.4f}" for n, v in results.items() for m in METRICS[n] if m in v)


def collect(seeds: list[int], task_names: list[str], infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed: the multi-task and single-task test metrics, Δm%, timings and split sizes."""
    runs = []
    for seed in seeds:
        mine = [i for i in infos if i["seed"] == seed]
        mtl = next(i for i in mine if i["tasks"] == task_names)
        singles = {i["tasks"][0]: i for i in mine if len(i["tasks"]) == 1} if len(task_names) > 1 else {}
        stl = {name: (singles[name] if singles else mtl)["test"][name] for name in task_names}
        timing = {
            "multi-task": {k: v for k, v in mtl.items() if k not in ("test", "seed", "tasks", "sizes")},
            "single-task": {
                n: {k: v for k, v in i.items() if k not in ("test", "seed", "tasks", "sizes")}
                for n, i in singles.items()
            },
        }
        results = {"multi-task": mtl["test"], "single-task": stl}
        runs.append(
            {
                "seed": seed,
                "test": results,
                "delta_m": delta_m(
                    results["multi-task"], results["single-task"], higher_is_better(task_names)
                ),
                "timing": timing,
                "sizes": mtl["sizes"],
            }
        )
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    argv = expand_fast(argv, FAST_ARGS)
    quiet_lightning()
    start = time.perf_counter()
    cli = _process_cli(argv)
    out = Path(cli.config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if _global_zero():
        cli.parser.save(cli.config, str(out / "config.yaml"), overwrite=True, skip_validation=True)
    seeds = list(cli.config["seeds"])
    task_names = [t.name for t in make_tasks(cli.config["model"].get("tasks") or TASK_NAMES)]
    # The multi-task model and each single-task model, for every seed; the heavier fits (with the
    # decoder) first, so that parallel workers finish together. The first seed's multi-task model is
    # the one saved (model.ckpt) and exported.
    jobs = [
        {"seed": s, "tasks": task_names, "checkpoint": str(out / "model.ckpt") if s == seeds[0] else None}
        for s in seeds
    ]
    if len(task_names) > 1:
        singles = [{"seed": s, "tasks": [n]} for s in seeds for n in task_names]
        jobs += sorted(singles, key=lambda j: j["tasks"][0] != "segmentation")
    workers, threads = _parallelism(cli, len(jobs))
    torch.set_num_threads(threads)
    infos = run_jobs(argv, jobs, workers, threads)
    runs = collect(seeds, task_names, infos)
    if not _global_zero():  # under DDP every rank trains; rank 0 reports, writes and exports
        return {"runs": runs}
    for run in runs:
        print(f"seed {run['seed']}: Δm% {run['delta_m']['per_task_mean']:+.2f}", flush=True)
    summary = summarise(runs)
    wall = time.perf_counter() - start
    command = command_line(COMMAND, given)
    result: dict[str, Any] = {
        "recipe": "vision_multi_fashion",
        "command": command,
        "seeds": seeds,
        "wall_seconds": round(wall, 1),
        "workers": workers,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        **summary,
        "runs": runs,
        "model": cli.config["model"].as_dict(),
        "data": cli.config["data"].as_dict(),
        "validation": cli.config["validation"].as_dict(),
        "trainer": {"max_epochs": cli.config["trainer"]["max_epochs"]},
        "delta_m_definition": "LibMTL: mean over tasks of the mean relative change of the task's metrics "
        "(accuracy; mIoU and pixel accuracy for segmentation) vs its single-task model, in %, positive = "
        "multi-task better; flat_mean: the mean over all four metrics (Nash-MTL/FAMO weighting, sign as here).",
    }
    if cli.config["zoo_dir"]:
        entry = Path(cli.config["zoo_dir"]) / ENTRY
        model = MultiTaskModule.load_from_checkpoint(out / "model.ckpt", weights_only=True)
        export(model, entry, runs[0], result)
        result["zoo_entry"] = str(entry)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nTest results over seeds {seeds} ({wall / 60:.1f} min wall):\n{results_table(summary)}")
    print(f"\nSaved {out / 'results.json'} and {out / 'model.ckpt'}")
    return result


def _parallelism(cli: RecipeCLI, n_jobs: int) -> tuple[int, int]:
    """``(workers, threads)``: by default one single-threaded worker process per CPU core (small convs
    gain little from intra-op threads, and on a shared machine threads that wait for each other at every
    op are many times slower); one in-process run when the Trainer itself uses several devices."""
    cores = os.cpu_count() or 1
    trainer = cli.config["trainer"]
    single_device = str(trainer.get("accelerator")) in ("auto", "cpu") and trainer.get("devices") in (
        "auto",
        1,
        "1",
    )
    workers = cli.config["workers"] or (min(cores, n_jobs) if single_device else 1)
    threads = cli.config["threads"] or (1 if workers > 1 else cores)
    return max(1, workers), max(1, threads)


def export(
    model: MultiTaskModule, entry: Path, first_run: Mapping[str, Any], result: Mapping[str, Any]
) -> None:
    """Save the first seed's multi-task model as a zoo entry; the card carries the measured numbers."""
    summary = {
        model_name: {
            f"{task}/{metric}": f"{v['mean']:.4f} +/- {v['std']:.4f}"
            for task, metrics in result["test"][model_name].items()
            for metric, v in metrics.items()
            if metric in METRICS[task]
        }
        for model_name in MODELS
    }
    sizes = first_run["sizes"]
    size = int(result["data"]["image_size"])
    card = {
        **CARD,
        "training_data": f"Multi-Fashion canvases composed with seed {result['data']['compose_seed']}: "
        f"{sizes['train']:,} train / {sizes['val']:,} validation canvases from Fashion-MNIST's training images "
        f"(split with seed {first_run['seed']}), {sizes['test']:,} test canvases from its t10k images; the "
        "metrics below are this model's on the test canvases.",
        "recipe": {
            "command": result["command"],
            "measured": f"{len(result['seeds'])} seeds {result['seeds']}, wall {result['wall_seconds']} s on "
            f"{result['cpu_count']} CPU cores ({result['workers']} worker processes, {result['threads']} torch "
            "thread(s) each)",
            "test_mean_std_over_seeds": summary,
            "delta_m_percent_vs_single_task": {
                k: f"{v['mean']:+.2f} +/- {v['std']:.2f}" for k, v in result["delta_m_percent"].items()
            },
            "exported": f"the multi-task model of seed {first_run['seed']} (the first seed), its best validation check",
        },
    }
    model.save_pretrained(
        entry,
        metrics=first_run["test"]["multi-task"],
        card=card,
        extra={"image_mode": "L", "image_size": [size, size], "input_range": [0.0, 1.0]},
    )


if __name__ == "__main__":
    main()
