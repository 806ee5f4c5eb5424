"""Tables as multi-task inputs: a pipeline fitted on the training split (standardisation, imputation with
missingness flags, categorical ids) that travels with the model, and a data module for one labelled table.

Example:
    >>> import pandas as pd
    >>> pipe = TabularPipeline.fit(pd.DataFrame({"age": [40.0, 60.0], "sex": ["f", "m"]}))
    >>> pipe.transform([{"age": 50.0, "sex": "m"}])["categorical"].tolist()
    [[3]]
"""

from lightning_mtl.tabular.columns import CategoricalColumn, NumericColumn, TabularInputError
from lightning_mtl.tabular.data import TabularDataModule, TensorBatches, split_indices
from lightning_mtl.tabular.pipeline import TabularPipeline

__all__ = [
    "CategoricalColumn",
    "NumericColumn",
    "TabularDataModule",
    "TabularInputError",
    "TabularPipeline",
    "TensorBatches",
    "split_indices",
]
