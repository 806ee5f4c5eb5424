"""``MultiTaskDataModule``: per-task datasets or one multi-label dataset -> tokenised, split, batched."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_mtl.data.collate import MultiTaskCollator
from lightning_mtl.data.samplers import LengthGroupedSampler, ResumableSampler, ShuffleSampler
from lightning_mtl.kinds import IGNORE_INDEX
from lightning_mtl.tasks import Task

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
TRAIN_MODES = ("max_size_cycle", "min_size", "max_size")
CACHE_VERSION = 1  # bump when the encoding below changes, so old cache files are not reused


class MultiTaskDataModule(L.LightningDataModule):
    """Data for a :class:`~lightning_mtl.MultiTaskModule`.

    Args:
        datasets: either ``{task_name: dataset}`` (one dataset per task, *heterogeneous*; batched by a
            ``CombinedLoader``) or a single dataset whose examples carry several label columns (a missing
            label — ``None``, NaN, -100 or an absent key — masks that example out of that task). Each
            dataset is a ``datasets.Dataset``, a ``DatasetDict``/dict of splits (``train``,
            ``validation``/``val``, ``test``), or a map-style torch ``Dataset`` returning dicts.
        tasks: the tasks (for label names -> ids, target dtypes and missing-label filling).
        tokenizer: a Hugging Face tokenizer, or its path / hub id / ``pkg:`` ref. When given, the
            ``text_key`` column is tokenised once with a cached ``datasets.map``. Token tasks read a
            ``tokens`` column (list of words) and word-level tags, aligned to the first sub-token.
        max_length: truncation length, or ``{task_name: length}``.
        batch_size: per task (heterogeneous) or per batch; may be ``{task_name: size}``.
        val_fraction, test_fraction, seed: random split of datasets that come without those splits.
        train_mode: how per-task training loaders are combined: ``max_size_cycle`` (default: the
            longest epoch; shorter datasets cycle), ``min_size`` or ``max_size``.
        group_by_length: batch tokenised training examples of similar length together
            (:class:`~lightning_mtl.data.samplers.LengthGroupedSampler`), which cuts padding.
        nonfinite: ``"raise"`` (default) or ``"skip"`` rows with a NaN/inf input and infinite labels
            (:class:`~lightning_mtl.data.MultiTaskCollator`).
        cache_dir: where tokenised datasets are cached (``None``: datasets' own cache for file-backed
            datasets, none for in-memory ones).

    Training loaders are ``torchdata`` ``StatefulDataLoader`` s: Lightning saves their position (sampler
    order and batches served, every task's loader of a ``CombinedLoader``) in checkpoints, so a run resumed
    from a mid-epoch checkpoint reads exactly the batches the interrupted run would have read.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"x": [[float(i)] for i in range(20)], "y": [i % 2 for i in range(20)]})
        >>> dm = MultiTaskDataModule({"y": ds}, tasks=[Task("y", kind="binary")], batch_size=4)
        >>> dm.setup("fit")
        >>> len(dm.splits["train"]["y"]), len(dm.splits["val"]["y"]), len(dm.splits["test"]["y"])
        (16, 2, 2)
    """

    def __init__(
        self,
        datasets: Any,
        tasks: Sequence[Task | Mapping[str, Any]],
        *,
        tokenizer: Any = None,
        text_key: str = "text",
        max_length: int | Mapping[str, int] = 128,
        batch_size: int | Mapping[str, int] = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        train_mode: str = "max_size_cycle",
        cache_dir: str | None = None,
        group_by_length: bool = True,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {train_mode!r}.")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1."
            )
        self.tasks = [Task.coerce(t) for t in tasks]
        self.task_by_name = {t.name: t for t in self.tasks}
        self.heterogeneous = _is_per_task(datasets, self.task_by_name)
        if self.heterogeneous:
            unknown = set(datasets) - set(self.task_by_name)
            if unknown:
                raise KeyError(
                    f"Datasets given for unknown task(s) {sorted(unknown)}; tasks are {sorted(self.task_by_name)}."
                )
        self.raw = dict(datasets) if self.heterogeneous else {"__all__": datasets}
        self._tokenizer = tokenizer
        self.text_key = text_key
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.num_workers = num_workers
        self.train_mode = train_mode
        self.cache_dir = cache_dir
        self.group_by_length = group_by_length
        self.nonfinite = nonfinite
        self.splits: dict[str, dict[str, Any]] = {}

    # --- preparation ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if isinstance(self._tokenizer, str):
            from transformers import AutoTokenizer

            from lightning_mtl.backbones.hf_encoder import resolve_model_path

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self._tokenizer))
        return self._tokenizer

    def _per(self, value: Any, name: str) -> Any:
        return value.get(name, next(iter(value.values()))) if isinstance(value, Mapping) else value

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits: dict[str, dict[str, Any]] = {"train": {}, "val": {}, "test": {}}
        for name, data in self.raw.items():
            parts = self._split(name, data)
            for split, ds in parts.items():
                splits[split][name] = self._prepare(name, split, ds)
        for split, per_task in splits.items():
            for name, ds in per_task.items():
                if split == "train" and len(ds) == 0:
                    raise ValueError(
                        f"Task {name!r}: the training dataset is empty. An empty loader would silently end every "
                        "epoch; check the data source, filters and split fractions."
                    )
        self.splits = splits

    def _split(self, name: str, data: Any) -> dict[str, Any]:
        who = "the dataset" if name == "__all__" else f"Task {name!r}"
        if isinstance(data, Mapping):
            parts = {SPLIT_NAMES[k]: v for k, v in data.items() if k in SPLIT_NAMES}
            if "train" not in parts:
                raise KeyError(f"{who}: a dict of splits needs a 'train' split, got {sorted(data)}.")
            rest = self._random_split(parts["train"], [s for s in ("val", "test") if s not in parts])
            return {**rest, **{k: v for k, v in parts.items() if k != "train"}}
        if len(data) == 0:
            raise ValueError(f"{who}: the dataset is empty. An empty loader would silently end every epoch.")
        return self._random_split(data, ["val", "test"])

    def _random_split(self, data: Any, wanted: list[str]) -> dict[str, Any]:
        n = len(data)
        sizes = {
            "val": round(n * self.val_fraction) if "val" in wanted else 0,
            "test": round(n * self.test_fraction) if "test" in wanted else 0,
        }
        sizes["train"] = n - sizes["val"] - sizes["test"]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        bounds = {
            "train": perm[: sizes["train"]],
            "val": perm[sizes["train"] : sizes["train"] + sizes["val"]],
            "test": perm[sizes["train"] + sizes["val"] :],
        }
        out = {}
        for split in ("train", *wanted):
            idx = sorted(bounds[split])
            out[split] = data.select(idx) if hasattr(data, "select") else Subset(data, idx)
        return out

    def _prepare(self, name: str, split: str, ds: Any) -> Any:
        """Encode string labels and tokenise text (HF datasets); torch datasets pass through."""
        if not hasattr(ds, "map") or not hasattr(ds, "column_names"):
            return ds
        tasks = [self.task_by_name[name]] if name in self.task_by_name else self.tasks
        label_maps = {
            t.target_key: {lab: i for i, lab in enumerate(t.labels)}
            for t in tasks
            if t.labels and t.target_key in ds.column_names
        }
        token_tasks = [
            t for t in tasks if t.kind_obj.label_level == "token" and t.target_key in ds.column_names
        ]
        tok = self.tokenizer if self._tokenizer is not None else None
        text_key = self.text_key if self.text_key in ds.column_names else None
        if tok is None and not label_maps:
            return ds
        if tok is not None and text_key is None and "tokens" not in ds.column_names:
            raise KeyError(
                f"Task {name!r} ({split}): no text column {self.text_key!r} (nor 'tokens') to tokenise; columns: {ds.column_names}."
            )
        max_length = int(self._per(self.max_length, name))

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {}
            for key, mapping in label_maps.items():
                if any(t.target_key == key for t in token_tasks):
                    continue
                out[key] = [_encode_label(v, mapping, name, key) for v in batch[key]]
            if tok is None:
                return out
            if token_tasks and "tokens" in batch:
                enc = tok(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
                for t in token_tasks:
                    mapping = label_maps.get(t.target_key, {})
                    out[t.target_key] = [
                        _align(enc.word_ids(i), tags, mapping, name)
                        for i, tags in enumerate(batch[t.target_key])
                    ]
            else:
                enc = tok(batch[text_key], truncation=True, max_length=max_length)  # type: ignore[index]
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in enc:
                    out[k] = enc[k]
            return out

        drop = [c for c in (text_key, "tokens") if c is not None and c in ds.column_names and tok is not None]
        cache_file = None
        if self.cache_dir is not None:
            from datasets.fingerprint import Hasher

            os.makedirs(self.cache_dir, exist_ok=True)
            key = Hasher.hash(
                [
                    ds._fingerprint if not _in_memory(ds) else ds.to_dict(),
                    getattr(tok, "name_or_path", None),
                    max_length,
                    label_maps,
                    text_key,
                    drop,
                    [t.target_key for t in token_tasks],
                    CACHE_VERSION,
                ]
            )
            cache_file = os.path.join(self.cache_dir, f"{name.strip('_')}-{split}-{key}.arrow")
        return ds.map(
            encode,
            batched=True,
            remove_columns=drop,
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
            desc=f"tokenising {name}/{split}",
        )

    # --- loaders ----------------------------------------------------------------------------------
    def collator(self) -> MultiTaskCollator:
        tok = self.tokenizer if self._tokenizer is not None else None
        pad = getattr(tok, "pad_token_id", None) or 0
        return MultiTaskCollator(
            self.tasks, pad_token_id=pad, nonfinite=self.nonfinite, fill_absent=not self.heterogeneous
        )

    def _loader(self, ds: Any, name: str, train: bool) -> DataLoader:
        bs = (
            int(self._per(self.batch_size, name))
            if train or self.eval_batch_size is None
            else int(self.eval_batch_size)
        )
        tokenised = hasattr(ds, "column_names") and "input_ids" in ds.column_names
        sampler: ResumableSampler | None = None
        loader_class = StatefulDataLoader if train else DataLoader  # training position saved in checkpoints
        if not train and tokenised:
            ds = _sorted_by_length(ds)  # less padding at evaluation; order does not matter there
        elif train and tokenised and self.group_by_length:
            sampler = LengthGroupedSampler([len(x) for x in ds["input_ids"]], bs, seed=self.seed)
        elif train:
            # the order a function of (seed, epoch): a resumed run's later epochs match too, which the
            # generator-driven RandomSampler does not guarantee (the loader draws from its generator as well)
            sampler = ShuffleSampler(len(ds), seed=self.seed)
        with (
            warnings.catch_warnings()
        ):  # torchdata calls the deprecated torch.set_vital: not the user's concern
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            return loader_class(
                ds,
                batch_size=bs,
                sampler=sampler,
                collate_fn=self.collator(),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(self.seed) if train else None,
            )

    def _combined(self, split: str, mode: str) -> Any:
        if not self.splits:
            self.setup()
        loaders = {
            name: self._loader(ds, name, split == "train")
            for name, ds in self.splits[split].items()
            if len(ds) > 0
        }
        if not self.heterogeneous:
            return loaders.get("__all__", [])
        return CombinedLoader(loaders, mode=mode) if loaders else []  # type: ignore[arg-type]

    def train_dataloader(self) -> Any:
        return self._combined("train", self.train_mode)

    def may_yield_unlabelled_batches(self) -> bool:
        """Whether a training batch could hold no label for any task. ``False`` only when the training data
        shows it cannot: with one dataset, every row has a label for some task; with per-task datasets, the
        longest one (present in every combined batch) has a label in every row. Read from the label columns
        of ``datasets`` tables on the host (other datasets, or ``nonfinite="skip"``, which can mask labels:
        ``True``). Every DDP rank computes the same answer from the same data, so a module may leave out the
        per-step agreement on skipping unlabelled batches when it is ``False``.

        Example:
            >>> from datasets import Dataset
            >>> ds = Dataset.from_dict({"x": [[0.0], [1.0]], "a": [1, None], "b": [None, 0.5]})
            >>> tasks = [Task("a", kind="binary"), Task("b", kind="regression")]
            >>> dm = MultiTaskDataModule({"train": ds, "val": ds, "test": ds}, tasks=tasks)
            >>> dm.setup(); dm.may_yield_unlabelled_batches()
            False
        """
        if not self.splits:
            self.setup()
        if self.nonfinite == "skip":
            return True
        train = {name: ds for name, ds in self.splits["train"].items() if len(ds) > 0}
        if not train:
            return True
        if self.heterogeneous:
            name = max(train, key=lambda n: len(train[n]))
            tasks = [self.task_by_name[name]]
            ds = train[name]
        else:
            tasks, ds = self.tasks, train.get("__all__")
        columns = getattr(ds, "column_names", None)
        if columns is None:
            return True  # a torch dataset: reading every example could be costly
        labelled = [False] * len(ds)
        for task in tasks:
            if task.target_key in columns:
                for i, value in enumerate(ds[task.target_key]):
                    labelled[i] = labelled[i] or not _missing(value)
        return not all(labelled)

    def val_dataloader(self) -> Any:
        return self._combined("val", "max_size")

    def test_dataloader(self) -> Any:
        return self._combined("test", "max_size")

    def predict_dataloader(self) -> Any:
        return self._combined("test", "max_size")


def _is_per_task(datasets: Any, tasks: Mapping[str, Task]) -> bool:
    if not isinstance(datasets, Mapping):
        return False
    return not (type(datasets).__name__ == "DatasetDict" or set(datasets) <= set(SPLIT_NAMES))


def _missing(value: Any) -> bool:
    """A missing label as the collator reads it: None, NaN, -100, or a sequence of only those (token tags)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value == IGNORE_INDEX
    if isinstance(value, (list, tuple)):
        return all(_missing(v) for v in value)
    return False


def _in_memory(ds: Any) -> bool:
    return not getattr(ds, "cache_files", None)


def _encode_label(value: Any, mapping: Mapping[str, int], task: str, key: str) -> Any:
    if isinstance(value, str):
        if value not in mapping:
            raise ValueError(
                f"Task {task!r}, key {key!r}: label {value!r} is not one of the task's labels {list(mapping)}."
            )
        return mapping[value]
    if isinstance(value, list):
        return [_encode_label(v, mapping, task, key) for v in value]
    return value


def _align(word_ids: list[int | None], tags: list[Any], mapping: Mapping[str, int], task: str) -> list[int]:
    """Word-level tags -> sub-token labels: the first sub-token of a word gets its tag, the rest -100."""
    labels, previous = [], None
    for wid in word_ids:
        if wid is None or wid == previous:
            labels.append(IGNORE_INDEX)
        else:
            tag = tags[wid]
            labels.append(int(_encode_label(tag, mapping, task, "tags")) if tag is not None else IGNORE_INDEX)
        previous = wid
    return labels


def _sorted_by_length(ds: Any) -> Any:
    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return ds.select(order)
