"""Multi-task data: the data module, the collator and loaders for the embedded offline data sets."""

from lightning_mtl.data.collate import MultiTaskCollator
from lightning_mtl.data.datamodule import MultiTaskDataModule

__all__ = ["MultiTaskCollator", "MultiTaskDataModule"]
