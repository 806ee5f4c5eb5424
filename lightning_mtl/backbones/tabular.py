"""``TabularMLP``: embeddings for categorical columns + an MLP, with the fitted table pipeline inside."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl.backbones.mlp import MLPBackbone
from lightning_mtl.tabular.pipeline import Rows, TabularPipeline


def embedding_width(cardinality: int, cap: int) -> int:
    """Embedding width of a categorical column: half its rows, rounded up, at most ``cap``."""
    return max(1, min(cap, (cardinality + 1) // 2))


class TabularMLP(nn.Module):
    """A tabular backbone: ``(numeric, categorical) -> [batch, hidden[-1]]`` features.

    Each categorical column gets an embedding (width ``min(embedding_dim, ceil(rows / 2))``); the
    embeddings and the numeric features (standardised values and missingness flags) feed an
    :class:`~lightning_mtl.backbones.MLPBackbone`. The fitted
    :class:`~lightning_mtl.tabular.TabularPipeline` is part of the backbone: :meth:`spec` stores its
    state, so a saved model rebuilds it, and :meth:`preprocess` turns raw rows (a DataFrame, a dict,
    a list of dicts) into the inputs of :meth:`forward`.

    Args:
        pipeline: a fitted :class:`~lightning_mtl.tabular.TabularPipeline` or its ``to_dict()``.
        hidden: widths of the MLP layers. ``dropout``, ``norm``: as in ``MLPBackbone``.
        embedding_dim: the largest embedding width.

    Example:
        >>> import pandas as pd
        >>> train = pd.DataFrame({"age": [50.0, 70.0, None], "sex": ["f", "m", "m"]})
        >>> backbone = TabularMLP(TabularPipeline.fit(train), hidden=(8,))
        >>> backbone(**backbone.preprocess({"age": 61.0, "sex": "f"})).shape
        torch.Size([1, 8])
        >>> TabularMLP(**backbone.spec()["init_args"]).pipeline.columns
        ['age', 'sex']
    """

    input_keys = ("numeric", "categorical")
    input_kind = "table"
    """What :meth:`preprocess` reads: table rows (a CSV file's rows on the command line), not text."""

    def __init__(
        self,
        pipeline: TabularPipeline | Mapping[str, Any],
        hidden: Sequence[int] = (128, 128),
        dropout: float = 0.1,
        norm: bool = True,
        embedding_dim: int = 8,
    ) -> None:
        super().__init__()
        self.pipeline = TabularPipeline.coerce(pipeline)
        widths = [int(h) for h in hidden]
        self._args = {
            "hidden": widths,
            "dropout": float(dropout),
            "norm": bool(norm),
            "embedding_dim": int(embedding_dim),
        }
        embedding_widths = [embedding_width(rows, int(embedding_dim)) for rows in self.pipeline.cardinalities]
        self.embeddings = nn.ModuleList(
            nn.Embedding(rows, w) for rows, w in zip(self.pipeline.cardinalities, embedding_widths)
        )
        width = self.pipeline.numeric_width + sum(embedding_widths)
        self.mlp = MLPBackbone(width, hidden=widths, dropout=dropout, norm=norm)
        self.out_features = self.mlp.out_features

    def forward(self, numeric: Tensor, categorical: Tensor) -> Tensor:
        if categorical.shape[-1] != len(self.embeddings) or numeric.shape[-1] != self.pipeline.numeric_width:
            raise ValueError(
                f"TabularMLP expects numeric [batch, {self.pipeline.numeric_width}] and categorical "
                f"[batch, {len(self.embeddings)}], got {tuple(numeric.shape)} and {tuple(categorical.shape)}. "
                "Build the inputs with backbone.preprocess(rows)."
            )
        parts = [numeric.float(), *(emb(categorical[:, i]) for i, emb in enumerate(self.embeddings))]
        return self.mlp(torch.cat(parts, dim=1))  # type: ignore[no-any-return]

    def preprocess(self, rows: Rows) -> dict[str, Tensor]:
        """Raw rows (a DataFrame, one row as a dict, or a list of dicts) -> ``{"numeric", "categorical"}``.

        Unknown columns are ignored; a missing input column or a non-numeric value in a numeric column
        raises a :class:`~lightning_mtl.tabular.TabularInputError` naming it.
        """
        return self.pipeline.transform(rows)

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` with the pipeline's fitted state: JSON, rebuilds this backbone."""
        return {
            "class_path": "lightning_mtl.backbones.TabularMLP",
            "init_args": {"pipeline": self.pipeline.to_dict(), **self._args},
        }
