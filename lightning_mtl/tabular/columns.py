"""One fitted input column of a table: how a numeric or a categorical column becomes model features.

A column is fitted on the training split only and stored as plain JSON (:func:`column_to_dict`,
:func:`column_from_dict`), so a saved model rebuilds exactly the transform it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

SKEW_THRESHOLD = 2.0
"""A non-negative column whose training skewness exceeds this is log1p-transformed before scaling."""


class TabularInputError(ValueError):
    """Rows a fitted table transform cannot take (a missing column, a value of the wrong type); names the
    column, and the row and value where there is one."""


def _is_empty(value: Any) -> bool:
    """``None``, NaN (``pd.NA``, ``NaT``) or a blank string."""
    if isinstance(value, str):
        return not value.strip()
    return (
        value is None
        or value is pd.NA
        or value is pd.NaT
        or (isinstance(value, (float, np.floating)) and value != value)
    )


def is_missing(values: pd.Series) -> np.ndarray:
    """``True`` where a cell is empty: ``None``, NaN or a blank string."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return np.array(values.isna(), dtype=bool)
    return np.fromiter((_is_empty(v) for v in values.tolist()), dtype=bool, count=len(values))


def _where(position: int) -> str:
    return f"row {position + 1}"


@dataclass(frozen=True)
class NumericColumn:
    """A numeric input: optional ``log1p``, standardisation with training statistics, clipping, and
    imputation of missing values by the training median (plus a 0/1 missingness feature).

    Example:
        >>> col = NumericColumn.fit("age", pd.Series([20.0, 40.0, None, 60.0]))
        >>> col.median, col.indicator, col.width
        (40.0, True, 2)
        >>> col.encode(pd.Series([40.0, None])).tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """

    name: str
    median: float
    mean: float
    std: float
    log: bool = False
    indicator: bool = False
    clip: float | None = 5.0

    @classmethod
    def fit(
        cls, name: str, values: pd.Series, *, log_skewed: bool = True, clip: float | None = 5.0
    ) -> NumericColumn:
        """Statistics of the training values of column ``name``."""
        numbers = cls.parse(name, values)
        observed = numbers[~np.isnan(numbers)]
        if observed.size == 0:
            raise TabularInputError(
                f"column {name!r} has no values in the training rows; drop it or fill it in."
            )
        log = bool(log_skewed and observed.min() >= 0 and pd.Series(observed).skew() > SKEW_THRESHOLD)
        scaled = np.log1p(observed) if log else observed
        std = float(scaled.std())
        return cls(
            name=name,
            median=float(np.median(observed)),
            mean=float(scaled.mean()),
            std=std if std > 0 and math.isfinite(std) else 1.0,
            log=log,
            indicator=bool(observed.size < numbers.size),
            clip=clip,
        )

    @property
    def width(self) -> int:
        """Features this column produces: the value, and the missingness flag if it has one."""
        return 2 if self.indicator else 1

    @staticmethod
    def parse(name: str, values: pd.Series) -> np.ndarray:
        """The column as float64 with NaN where empty; a value that is not a number raises, naming it."""
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            numbers = values.astype("float64").to_numpy(dtype="float64", na_value=np.nan)
        else:
            missing = is_missing(values)
            numbers = pd.to_numeric(values.where(~missing, None), errors="coerce").to_numpy(
                dtype="float64", na_value=np.nan
            )
            bad = np.flatnonzero(np.isnan(numbers) & ~missing)
            if bad.size:
                value = values.iloc[bad[0]]
                raise TabularInputError(
                    f"column {name!r} is numeric, but {_where(int(bad[0]))} holds {value!r} "
                    f"({type(value).__name__}); give a number, or leave the cell empty when unknown."
                )
        NumericColumn.check_finite([name], numbers[:, None])
        return numbers

    @staticmethod
    def check_finite(names: list[str], numbers: np.ndarray) -> None:
        """Refuse ``±inf`` in a ``[rows, len(names)]`` array, naming the first column and row."""
        infinite = np.argwhere(np.isinf(numbers))
        if infinite.size:
            row, col = (int(i) for i in infinite[0])
            raise TabularInputError(
                f"column {names[col]!r}: {_where(row)} holds {numbers[row, col]}, which is not finite; "
                "give a number, or leave the cell empty when unknown."
            )

    def encode(self, values: pd.Series) -> np.ndarray:
        """``[rows, width]`` float32 features: the scaled value (median where missing) and the flag."""
        return scale_numbers([self], self.parse(self.name, values)[:, None])


def scale_numbers(columns: Sequence[NumericColumn], numbers: np.ndarray) -> np.ndarray:
    """Parsed values ``[rows, len(columns)]`` (NaN where missing) -> float32 features: every column's
    imputed, (log1p-)transformed, standardised and clipped value, then the missingness flags of the
    columns that have one. One array operation per step for the whole table."""
    missing = np.isnan(numbers)
    filled = np.where(missing, [c.median for c in columns], numbers)
    log = np.array([c.log for c in columns], dtype=bool)
    if log.any():
        filled[:, log] = np.log1p(np.maximum(filled[:, log], 0.0))
    scaled = (filled - np.array([c.mean for c in columns])) / np.array([c.std for c in columns])
    bounds = np.array([np.inf if c.clip is None else c.clip for c in columns])
    flags = missing[:, np.array([c.indicator for c in columns], dtype=bool)]
    return np.concatenate([np.clip(scaled, -bounds, bounds), flags], axis=1).astype("float32")


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical input as an integer id for an embedding: ``0`` when missing, ``1`` for a category
    not seen in training, ``2 + i`` for the i-th training category.

    Example:
        >>> col = CategoricalColumn.fit("sex", pd.Series(["male", "female", "male"]))
        >>> col.categories, col.cardinality
        (['female', 'male'], 4)
        >>> col.encode(pd.Series(["male", None, "other"])).tolist()
        [3, 0, 1]
    """

    MISSING: ClassVar[int] = 0
    UNKNOWN: ClassVar[int] = 1

    name: str
    categories: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, name: str, values: pd.Series) -> CategoricalColumn:
        """The sorted categories seen in the training values."""
        keys = cls.keys(name, values)
        return cls(name=name, categories=sorted({k for k in keys if k is not None}))

    @property
    def cardinality(self) -> int:
        """Rows of the embedding table: the categories plus ``missing`` and ``unknown``."""
        return len(self.categories) + 2

    @staticmethod
    def keys(name: str, values: pd.Series) -> list[str | None]:
        """Each cell as the string that names its category (``None`` when empty); ``3`` and ``3.0`` agree."""
        out: list[str | None] = []
        for position, value in enumerate(values.tolist()):
            if _is_empty(value):
                out.append(None)
            elif isinstance(value, str):
                out.append(value.strip())
            elif isinstance(value, (bool, np.bool_)):
                out.append(str(bool(value)))
            elif isinstance(value, (int, float, np.integer, np.floating)):
                number = float(value)
                out.append(str(int(number)) if number.is_integer() else str(number))
            else:
                raise TabularInputError(
                    f"column {name!r} is categorical, but {_where(position)} holds a "
                    f"{type(value).__name__} ({value!r}); give one category name per cell."
                )
        return out

    def encode(self, values: pd.Series) -> np.ndarray:
        """``[rows]`` int64 ids."""
        index = {c: i + 2 for i, c in enumerate(self.categories)}
        return np.array(
            [self.MISSING if k is None else index.get(k, self.UNKNOWN) for k in self.keys(self.name, values)],
            dtype="int64",
        )


def column_from_dict(data: Mapping[str, Any]) -> NumericColumn | CategoricalColumn:
    """Rebuild a column from :func:`column_to_dict` output."""
    data = dict(data)
    kind = data.pop("type", None)
    classes = {"numeric": NumericColumn, "categorical": CategoricalColumn}
    if kind not in classes:
        raise ValueError(f"a fitted column needs 'type' 'numeric' or 'categorical', got {kind!r}.")
    cls: Any = classes[kind]
    return cls(**data)  # type: ignore[no-any-return]


def column_to_dict(column: NumericColumn | CategoricalColumn) -> dict[str, Any]:
    """A JSON-able dict with a ``type`` key."""
    kind = "numeric" if isinstance(column, NumericColumn) else "categorical"
    return {"type": kind, **asdict(column)}
