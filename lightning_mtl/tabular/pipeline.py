"""``TabularPipeline``: raw table rows -> model tensors, fitted on the training split and saved with the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lightning_mtl.tabular.columns import (
    CategoricalColumn,
    NumericColumn,
    TabularInputError,
    column_from_dict,
    column_to_dict,
    scale_numbers,
)

FORMAT_VERSION = 1
"""Version of the :meth:`TabularPipeline.to_dict` layout; loading refuses newer ones."""

Rows: TypeAlias = pd.DataFrame | pd.Series | Mapping[str, Any] | Sequence[Mapping[str, Any]]


class TabularPipeline:
    """The fitted transform from raw rows to the tensors a tabular backbone takes.

    Numeric columns are standardised with training statistics (right-skewed non-negative ones after
    ``log1p``; the result clipped to ``±clip``); a missing value takes the training median and, for a
    column that had missing values in training, sets a 0/1 missingness feature. Categorical columns
    become ids for an embedding (``0`` missing, ``1`` a category unseen in training). Columns the
    pipeline does not know are ignored, so a full record (with outcomes, ids, ...) can be passed as is.

    Args:
        numeric: fitted :class:`NumericColumn` objects (or their dicts), in feature order.
        categorical: fitted :class:`CategoricalColumn` objects (or their dicts).

    Example:
        >>> train = pd.DataFrame({"age": [50.0, 70.0, None], "sex": ["f", "m", "m"]})
        >>> pipe = TabularPipeline.fit(train)
        >>> pipe.columns, pipe.numeric_width, pipe.cardinalities
        (['age', 'sex'], 2, [4])
        >>> batch = pipe.transform({"age": None, "sex": "x"})
        >>> batch["numeric"].tolist(), batch["categorical"].tolist()
        ([[0.0, 1.0]], [[1]])
        >>> TabularPipeline.from_dict(pipe.to_dict()).to_dict() == pipe.to_dict()
        True
    """

    def __init__(
        self,
        numeric: Sequence[NumericColumn | Mapping[str, Any]] = (),
        categorical: Sequence[CategoricalColumn | Mapping[str, Any]] = (),
    ) -> None:
        self.numeric = [c if isinstance(c, NumericColumn) else _column(c, NumericColumn) for c in numeric]
        self.categorical = [
            c if isinstance(c, CategoricalColumn) else _column(c, CategoricalColumn) for c in categorical
        ]
        names = self.columns
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"TabularPipeline: column(s) {duplicates} are given more than once.")
        if not names:
            raise ValueError("TabularPipeline needs at least one numeric or categorical column.")

    # --- fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        numeric: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        *,
        log_skewed: bool = True,
        clip: float | None = 5.0,
    ) -> TabularPipeline:
        """Fit on the training rows. Without column lists, numeric dtypes are numeric inputs and every
        other column categorical; with one list given, the other defaults to empty.

        ``log_skewed``: ``log1p`` non-negative columns whose training skewness exceeds
        :data:`~lightning_mtl.tabular.columns.SKEW_THRESHOLD` before standardising.
        ``clip``: bound of the standardised values (``None``: no bound).
        """
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"TabularPipeline.fit takes a pandas DataFrame, got {type(frame).__name__}.")
        if len(frame) == 0:
            raise ValueError("TabularPipeline.fit: the training frame has no rows.")
        if numeric is None and categorical is None:
            numeric = [
                str(c)
                for c in frame.columns
                if pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])
            ]
            categorical = [str(c) for c in frame.columns if str(c) not in numeric]
        numeric, categorical = list(numeric or []), list(categorical or [])
        missing = [c for c in numeric + categorical if c not in frame.columns]
        if missing:
            raise TabularInputError(
                f"the training frame lacks column(s) {missing}; it has {list(map(str, frame.columns))}."
            )
        return cls(
            [NumericColumn.fit(c, frame[c], log_skewed=log_skewed, clip=clip) for c in numeric],
            [CategoricalColumn.fit(c, frame[c]) for c in categorical],
        )

    # --- shape ------------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """The input columns a row must have: numeric ones, then categorical ones."""
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def numeric_width(self) -> int:
        """Width of the ``numeric`` tensor: one value per numeric column plus the missingness flags."""
        return sum(c.width for c in self.numeric)

    @property
    def cardinalities(self) -> list[int]:
        """Embedding rows per categorical column (its categories + missing + unknown)."""
        return [c.cardinality for c in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        """Names of the ``numeric`` tensor's features: every ``<column>``, then the ``<column>__missing``
        flags."""
        return [c.name for c in self.numeric] + [f"{c.name}__missing" for c in self.numeric if c.indicator]

    # --- transform --------------------------------------------------------------------------------
    def transform(self, rows: Rows) -> dict[str, Tensor]:
        """``{"numeric": float32 [rows, numeric_width], "categorical": int64 [rows, columns]}``.

        ``rows``: a DataFrame, one row as a dict or a Series, or a list of dicts. A row without one of
        :attr:`columns` raises a :class:`TabularInputError` naming it (give an empty value — ``None``,
        NaN or ``""`` — for an unknown one); so does a numeric cell that is not a number.
        """
        frame = self.as_frame(rows)
        n = len(frame)
        categorical = [c.encode(frame[c.name]) for c in self.categorical]
        return {
            "numeric": torch.from_numpy(self._numeric(frame)),
            "categorical": torch.from_numpy(
                np.stack(categorical, axis=1) if categorical else np.zeros((n, 0), dtype="int64")
            ),
        }

    def _numeric(self, frame: pd.DataFrame) -> np.ndarray:
        """All numeric columns at once (one array operation per step, not one per column): the values
        of :meth:`NumericColumn.encode`, laid out as :attr:`feature_names`."""
        if not self.numeric:
            return np.zeros((len(frame), 0), dtype="float32")
        names = [c.name for c in self.numeric]
        block = frame[names]
        if all(pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t) for t in block.dtypes):
            numbers = block.to_numpy(dtype="float64", na_value=np.nan)
            NumericColumn.check_finite(names, numbers)
        else:
            numbers = np.stack([NumericColumn.parse(c, block[c]) for c in names], axis=1)
        return scale_numbers(self.numeric, numbers)

    def as_frame(self, rows: Rows) -> pd.DataFrame:
        """The rows as a DataFrame with a fresh index, after checking every input column is present."""
        if isinstance(rows, pd.DataFrame):
            frame, who = rows, "the rows"
        elif isinstance(rows, pd.Series):
            frame, who = rows.to_frame().T, "the row"
        elif isinstance(rows, Mapping):
            frame, who = pd.DataFrame([dict(rows)]), "the row"
        elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and rows:
            for i, row in enumerate(rows):
                if not isinstance(row, Mapping):
                    raise TabularInputError(
                        f"row {i + 1} is a {type(row).__name__}; each row is a dict of column -> value."
                    )
                self._check_columns(list(row), f"row {i + 1}")
            frame, who = pd.DataFrame([dict(r) for r in rows]), "the rows"
        else:
            raise TabularInputError(
                f"expected a DataFrame, one row as a dict, or a non-empty list of dicts; got {type(rows).__name__}."
            )
        if len(frame) == 0:
            raise TabularInputError(f"{who}: there are no rows.")
        self._check_columns([str(c) for c in frame.columns], who)
        return frame.reset_index(drop=True)

    def _check_columns(self, present: list[Any], who: str) -> None:
        have = set(present)
        missing = [c for c in self.columns if c not in have]
        if missing:
            raise TabularInputError(
                f"{who} lack{'s' if who != 'the rows' else ''} input column(s) {missing}; the model takes "
                f"{self.columns}. Give every column, with an empty value (None, NaN or '') where it is unknown."
            )

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able fitted state (``config.json`` stores it in the backbone's ``init_args``)."""
        return {
            "version": FORMAT_VERSION,
            "numeric": [column_to_dict(c) for c in self.numeric],
            "categorical": [column_to_dict(c) for c in self.categorical],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TabularPipeline:
        """Rebuild a pipeline from :meth:`to_dict` output."""
        version = data.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"TabularPipeline state version {version!r} is newer than this lightning-mtl reads "
                f"({FORMAT_VERSION}); upgrade lightning-mtl."
            )
        unknown = sorted(set(data) - {"version", "numeric", "categorical"})
        if unknown:
            raise ValueError(f"TabularPipeline state has unknown keys {unknown}.")
        return cls(data.get("numeric") or [], data.get("categorical") or [])

    @classmethod
    def coerce(cls, value: TabularPipeline | Mapping[str, Any]) -> TabularPipeline:
        """Accept a pipeline or its :meth:`to_dict` form."""
        if isinstance(value, TabularPipeline):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"expected a TabularPipeline or its dict, got {type(value).__name__}.")

    def __repr__(self) -> str:
        return (
            f"TabularPipeline(numeric={[c.name for c in self.numeric]}, "
            f"categorical={[c.name for c in self.categorical]})"
        )


def _column(data: Mapping[str, Any], expected: type) -> Any:
    column = column_from_dict({"type": "numeric" if expected is NumericColumn else "categorical", **data})
    if not isinstance(column, expected):
        raise ValueError(f"expected a {expected.__name__} spec, got {dict(data)!r}.")
    return column
