"""Shared tiny fixtures: a boring two-task model, a tiny BERT config and folder, toy data with a learnable signal."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.backbones import PACKAGED_MINILM, MLPBackbone, resolve_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_BERT = {
    "vocab_size": 30522,  # the packaged MiniLM tokenizer's vocabulary
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


@pytest.fixture
def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(**TINY_BERT)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random-initialised tiny BERT saved like a pretrained folder, with the packaged tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(path)
    return path


def load_script(path: Path, register: bool = False) -> ModuleType:
    """Import a script that is not in a package (a recipe, a benchmark) from its path, named after its file.

    ``register``: also put it in ``sys.modules`` (dataclasses defined in it look their module up there).
    """
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def toy_tabular(n: int = 256, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs ``x`` and four learnable targets derived from fixed random projections of ``x``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 8, generator=torch.Generator().manual_seed(123))
    z = x @ w
    return {
        "x": x,
        "risk": (z[:, 0] > 0).float(),
        "group": z[:, 1:4].argmax(dim=1),
        "flags": (z[:, 4:6] > 0).float(),
        "stay": z[:, 6] * 2.0 + 1.0,
    }


TABULAR_TASKS = [
    Task("risk", kind="binary", labels=["low", "high"]),
    Task("group", kind="multiclass", labels=["a", "b", "c"]),
    Task("flags", kind="multilabel", labels=["f0", "f1"]),
    Task("stay", kind="regression"),
]


class DictDataset(torch.utils.data.Dataset):
    """Rows of a dict of tensors as example dicts."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data
        self.n = len(next(iter(data.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


@pytest.fixture
def boring_module() -> MultiTaskModule:
    """The boring two-task model: an MLP backbone with a binary and a regression head."""
    torch.manual_seed(0)
    return MultiTaskModule(MLPBackbone(8, hidden=(32,), dropout=0.0), TABULAR_TASKS[::3], lr=1e-2)


class ToyTokenBackbone(nn.Module):
    """Token ids -> ``{"tokens": [B, L, H], "pooled": [B, H]}``."""

    def __init__(self, vocab: int = 20, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.out_features = hidden

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = torch.relu(self.proj(self.emb(input_ids)))
        return {"tokens": tokens, "pooled": tokens.mean(1)}


class ToyConvBackbone(nn.Module):
    """Images ``[B, 1, H, W]`` -> ``{"spatial": [B, C, H, W], "pooled": [B, C]}``."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.out_features = channels

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        spatial = self.conv(image)
        return {"spatial": spatial, "pooled": spatial.mean((2, 3))}


class RecordingLogger:
    """A Lightning logger that keeps every ``log_metrics`` call: ``history`` is a list of ``(step, metrics)``."""

    def __new__(cls):
        from lightning.pytorch.loggers.logger import Logger

        class _Recording(Logger):
            def __init__(self) -> None:
                super().__init__()
                self.history: list[tuple[int, dict[str, float]]] = []

            @property
            def name(self) -> str:
                return "recording"

            @property
            def version(self) -> int:
                return 0

            def log_metrics(self, metrics, step=None) -> None:  # type: ignore[override]
                self.history.append((step, dict(metrics)))

            def log_hyperparams(self, params, *args, **kwargs) -> None:  # type: ignore[override]
                pass

        return _Recording()


def logged_keys(logger) -> set[str]:
    """Every metric name a :class:`RecordingLogger` received."""
    return {k for _, metrics in logger.history for k in metrics}


def fit(module, loader, steps: int = 60, **trainer_kwargs):
    import lightning as L

    kwargs = {
        "max_steps": steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, loader)
    return trainer


def isolate_zoo(monkeypatch, root) -> None:
    """Make the zoo exactly the entries under ``root``: no repo entries, no user entries from other tests."""
    from lightning_mtl import zoo
    from lightning_mtl.zoo import registry

    monkeypatch.setenv(zoo.ENV_VAR, str(root))
    monkeypatch.setattr(registry, "repo_zoo_dir", lambda: None)
    monkeypatch.setattr(registry, "_USER", {})


def balancer_variants() -> list[tuple[str, dict]]:
    """Every registered balancer as ``(name, init kwargs)``; gradient methods that support both modes appear
    twice (``mode="params"`` and ``mode="features"``). Parametrising over this tests a new method for free."""
    from lightning_mtl.balancing import list_balancers
    from lightning_mtl.balancing.base import BALANCER_REGISTRY
    from lightning_mtl.balancing.gradient import GradientBalancer

    out: list[tuple[str, dict]] = []
    for name in list_balancers():
        if name.startswith("doc_"):  # registered by a doctest
            continue
        out.append((name, {}))
        cls = BALANCER_REGISTRY.get(name)
        if issubclass(cls, GradientBalancer) and cls.supports_features:
            default_mode = cls().mode
            out.append((name, {"mode": "params" if default_mode == "features" else "features"}))
    return out
