"""MultiTaskDataModule: splits, label encoding, tokenisation, token alignment, caching, loaders."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import DictDataset, toy_tabular
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Subset

from lightning_mtl import MultiTaskDataModule, Task
from lightning_mtl.backbones import PACKAGED_MINILM, resolve_model_path
from lightning_mtl.kinds import IGNORE_INDEX

TOPIC = Task("topic", kind="multiclass", labels=["sport", "tech", "politics"])
RISK = Task("risk", kind="binary", labels=["low", "high"])
STAY = Task("stay", kind="regression")
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))


def ids_dataset(n: int = 50) -> Dataset:
    return Dataset.from_dict({"id": list(range(n)), "risk": [i % 2 for i in range(n)]})


def text_dataset(n: int = 40, key: str = "topic") -> Dataset:
    """Texts of 1..12 words (so batches need different padding) with string topic labels."""
    texts = [" ".join(WORDS[j % len(WORDS)] for j in range(1 + (i * 5) % 12)) for i in range(n)]
    labels = [TOPIC.labels[i % 3] for i in range(n)] if key == "topic" else [i % 2 for i in range(n)]
    return Dataset.from_dict({"text": texts, key: labels})


def split_ids(dm: MultiTaskDataModule, name: str = "risk") -> dict[str, list[int]]:
    return {split: list(dm.splits[split][name]["id"]) for split in ("train", "val", "test")}


# --- construction -------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="train_mode must be one of"):
        MultiTaskDataModule({"risk": ids_dataset()}, [RISK], train_mode="sequential")
    with pytest.raises(ValueError, match="must be in \\[0, 1\\) and sum below 1"):
        MultiTaskDataModule({"risk": ids_dataset()}, [RISK], val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(KeyError, match=r"Datasets given for unknown task\(s\) \['other'\]"):
        MultiTaskDataModule({"risk": ids_dataset(), "other": ids_dataset()}, [RISK])


def test_tasks_may_be_dicts():
    dm = MultiTaskDataModule({"risk": ids_dataset()}, [RISK.to_dict()])
    assert dm.tasks == [RISK]


# --- splits -------------------------------------------------------------------------------------------


def test_seeded_split_sizes_partition_the_data():
    dm = MultiTaskDataModule({"risk": ids_dataset(50)}, [RISK], val_fraction=0.1, test_fraction=0.2, seed=3)
    dm.setup("fit")
    ids = split_ids(dm)
    assert {k: len(v) for k, v in ids.items()} == {"train": 35, "val": 5, "test": 10}
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(50))
    assert ids["train"] != list(range(35))  # a random split, not the first rows


def test_split_is_deterministic_per_seed():
    def ids(seed):
        dm = MultiTaskDataModule({"risk": ids_dataset(50)}, [RISK], seed=seed)
        dm.setup()
        return split_ids(dm)

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)
    assert ids(7)["val"] != ids(8)["val"]


def test_setup_twice_keeps_the_split():
    dm = MultiTaskDataModule({"risk": ids_dataset(50)}, [RISK], seed=1)
    dm.setup("fit")
    first = split_ids(dm)
    dm.setup("test")
    assert split_ids(dm) == first


def test_torch_dataset_is_split_with_subsets():
    data = {k: v for k, v in toy_tabular(40).items() if k in ("x", "risk")}
    dm = MultiTaskDataModule(
        {"risk": DictDataset(data)}, [RISK], val_fraction=0.25, test_fraction=0.25, seed=0
    )
    dm.setup()
    parts = {s: dm.splits[s]["risk"] for s in ("train", "val", "test")}
    assert all(isinstance(p, Subset) for p in parts.values())
    assert {s: len(p) for s, p in parts.items()} == {"train": 20, "val": 10, "test": 10}
    assert sorted(i for p in parts.values() for i in p.indices) == list(range(40))
    batch = next(iter(dm.train_dataloader()))[0]["risk"]
    assert batch["x"].shape == (20, 8) and batch["risk"].shape == (20,)  # default batch_size 32: one batch


def test_explicit_splits_are_respected():
    train, val, test = ids_dataset(30), ids_dataset(7), ids_dataset(4)
    dm = MultiTaskDataModule(
        {"risk": {"train": train, "validation": val, "test": test}}, [RISK], val_fraction=0.5
    )
    dm.setup()
    assert {s: len(dm.splits[s]["risk"]) for s in ("train", "val", "test")} == {
        "train": 30,
        "val": 7,
        "test": 4,
    }
    assert list(dm.splits["val"]["risk"]["id"]) == list(range(7))


def test_missing_splits_are_carved_from_train():
    dm = MultiTaskDataModule(
        {"risk": {"train": ids_dataset(40), "val": ids_dataset(3)}}, [RISK], test_fraction=0.25
    )
    dm.setup()
    ids = split_ids(dm)
    assert len(ids["val"]) == 3 and len(ids["test"]) == 10 and len(ids["train"]) == 30
    assert not set(ids["train"]) & set(ids["test"])


def test_dataset_dict_is_one_multi_label_dataset():
    dd = DatasetDict({"train": ids_dataset(20), "validation": ids_dataset(5), "test": ids_dataset(6)})
    dm = MultiTaskDataModule(dd, [RISK])
    dm.setup()
    assert not dm.heterogeneous
    assert {s: len(dm.splits[s]["__all__"]) for s in ("train", "val", "test")} == {
        "train": 20,
        "val": 5,
        "test": 6,
    }


def test_dict_of_splits_without_train():
    dm = MultiTaskDataModule({"risk": {"validation": ids_dataset(5)}}, [RISK])
    with pytest.raises(
        KeyError, match=r"Task 'risk': a dict of splits needs a 'train' split, got \['validation'\]"
    ):
        dm.setup()


def test_empty_task_dataset_raises():
    empty = Dataset.from_dict({"id": [], "risk": []})
    dm = MultiTaskDataModule(
        {"risk": empty, "stay": Dataset.from_dict({"id": [1, 2], "stay": [1.0, 2.0]})}, [RISK, STAY]
    )
    with pytest.raises(ValueError, match=r"Task 'risk': the dataset is empty"):
        dm.setup()


def test_empty_train_split_raises():
    dm = MultiTaskDataModule(
        {"risk": {"train": Dataset.from_dict({"id": [], "risk": []}), "validation": ids_dataset(4)}}, [RISK]
    )
    with pytest.raises(ValueError, match=r"Task 'risk': the training dataset is empty"):
        dm.setup()


# --- labels -------------------------------------------------------------------------------------------


def test_string_labels_are_mapped_to_ids():
    ds = Dataset.from_dict({"id": [0, 1, 2, 3], "topic": ["tech", "sport", "politics", "tech"]})
    dm = MultiTaskDataModule({"topic": ds}, [TOPIC], val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    train = dm.splits["train"]["topic"]
    assert dict(zip(train["id"], train["topic"])) == {0: 1, 1: 0, 2: 2, 3: 1}
    batch = next(iter(dm.train_dataloader()))[0]["topic"]
    assert batch["topic"].dtype == torch.long
    assert dict(zip(batch["id"].tolist(), batch["topic"].tolist())) == {0: 1, 1: 0, 2: 2, 3: 1}


def test_unknown_string_label_raises_naming_task_and_key():
    task = Task("topic", kind="multiclass", labels=["sport", "tech"], target_key="category")
    ds = Dataset.from_dict({"id": [0, 1], "category": ["tech", "cooking"]})
    dm = MultiTaskDataModule({"topic": ds}, [task], val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(
        ValueError,
        match=r"Task 'topic', key 'category': label 'cooking' is not one of the task's labels \['sport', 'tech'\]",
    ):
        dm.setup()


# --- tokenisation -------------------------------------------------------------------------------------


def test_tokenisation_and_dynamic_padding(tokenizer):
    dm = MultiTaskDataModule(
        {"topic": text_dataset(40)}, [TOPIC], tokenizer=PACKAGED_MINILM, batch_size=4, seed=0
    )
    dm.setup()
    train = dm.splits["train"]["topic"]
    assert {"input_ids", "attention_mask", "topic"} <= set(train.column_names)
    assert "text" not in train.column_names
    row = train[0]
    assert row["input_ids"][0] == tokenizer.cls_token_id and row["input_ids"][-1] == tokenizer.sep_token_id
    assert len(row["attention_mask"]) == len(row["input_ids"])
    widths = set()
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    for batch, _, _ in loader:
        b = batch["topic"]
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] == int(lengths.max())  # padded to the longest of this batch only
        assert torch.all(b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id)
        widths.add(b["input_ids"].shape[1])
    assert len(widths) > 1


def test_eval_loader_is_sorted_by_length():
    dm = MultiTaskDataModule(
        {"topic": text_dataset(40)},
        [TOPIC],
        tokenizer=PACKAGED_MINILM,
        batch_size=2,
        eval_batch_size=3,
        val_fraction=0.3,
    )
    dm.setup()
    lengths = []
    for batch, _, _ in dm.val_dataloader():
        if batch["topic"] is None:
            continue
        assert batch["topic"]["input_ids"].shape[0] <= 3
        lengths += batch["topic"]["attention_mask"].sum(1).tolist()
    assert len(lengths) == 12 and lengths == sorted(lengths)


def test_per_task_max_length():
    long_text = Dataset.from_dict({"text": [" ".join(WORDS * 4)] * 10, "topic": ["tech"] * 10})
    other = Dataset.from_dict({"text": [" ".join(WORDS * 4)] * 10, "risk": [1] * 10})
    dm = MultiTaskDataModule(
        {"topic": long_text, "risk": other},
        [TOPIC, RISK],
        tokenizer=PACKAGED_MINILM,
        max_length={"topic": 8, "risk": 20},
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dm.setup()
    assert {len(ids) for ids in dm.splits["train"]["topic"]["input_ids"]} == {8}
    assert {len(ids) for ids in dm.splits["train"]["risk"]["input_ids"]} == {20}


def test_text_column_missing_with_tokenizer():
    dm = MultiTaskDataModule({"risk": ids_dataset(10)}, [RISK], tokenizer=PACKAGED_MINILM)
    with pytest.raises(KeyError, match=r"Task 'risk' \(train\): no text column 'text'"):
        dm.setup()


def test_token_task_alignment(tokenizer):
    ner = Task("ner", kind="token", labels=["O", "B-PER", "B-LOC"])
    sentences = [["Zuckerberg", "visited", "Paris"], ["Paris", "tokenisation"]]
    tags = [["B-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    ds = Dataset.from_dict({"tokens": sentences, "ner": tags})
    dm = MultiTaskDataModule(
        {"ner": ds}, [ner], tokenizer=PACKAGED_MINILM, val_fraction=0.0, test_fraction=0.0
    )
    dm.setup()
    train = dm.splits["train"]["ner"]
    assert "tokens" not in train.column_names
    for i, (words, word_tags) in enumerate(zip(sentences, tags)):
        enc = tokenizer(words, is_split_into_words=True)
        assert train[i]["input_ids"] == enc["input_ids"]
        expected, previous = [], None
        for wid in enc.word_ids():
            first = wid is not None and wid != previous
            expected.append(ner.labels.index(word_tags[wid]) if first else IGNORE_INDEX)
            previous = wid
        assert train[i]["ner"] == expected
    # spelled out for the first sentence: [CLS] zu ##cker ##berg visited paris [SEP]
    assert train[0]["ner"] == [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, 0, 2, IGNORE_INDEX]
    batch = next(iter(dm.train_dataloader()))[0]["ner"]
    assert batch["ner"].shape == batch["input_ids"].shape
    assert batch["ner"][1, -1] == IGNORE_INDEX  # the shorter sentence's label padding


class NoCallTokenizer:
    """Looks like the packaged tokenizer to the cache key, but fails if asked to tokenise."""

    def __init__(self, real) -> None:
        self.name_or_path = real.name_or_path
        self.pad_token_id = real.pad_token_id

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenised again instead of loading the cached arrow file")


def test_cache_dir_reuses_the_cached_arrow_file(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    ds = text_dataset(30)

    def make(tok, **kwargs):
        dm = MultiTaskDataModule(
            {"topic": ds}, [TOPIC], tokenizer=tok, cache_dir=str(cache), seed=0, **kwargs
        )
        dm.setup()
        return dm

    first = make(tokenizer)
    files = sorted(p.name for p in cache.glob("*.arrow"))
    assert len(files) == 3 and all(name.startswith("topic-") for name in files)
    train_file = Path(first.splits["train"]["topic"].cache_files[0]["filename"])
    assert train_file.parent == cache and train_file.exists()
    mtime = os.path.getmtime(train_file)

    second = make(NoCallTokenizer(tokenizer))  # would raise if the map ran again
    assert sorted(p.name for p in cache.glob("*.arrow")) == files
    assert Path(second.splits["train"]["topic"].cache_files[0]["filename"]) == train_file
    assert os.path.getmtime(train_file) == mtime
    for split in ("train", "val", "test"):
        assert second.splits[split]["topic"].to_dict() == first.splits[split]["topic"].to_dict()

    # another max_length is another cache entry, not a stale hit
    third = make(tokenizer, max_length=4)
    assert len(list(cache.glob("*.arrow"))) == 6
    assert max(len(ids) for ids in third.splits["train"]["topic"]["input_ids"]) == 4


def test_cache_key_depends_on_the_text_column(tmp_path):
    ds = Dataset.from_dict(
        {"text": ["hello world"] * 6, "title": ["completely different words here"] * 6, "risk": [0, 1] * 3}
    )

    def input_ids(text_key):
        dm = MultiTaskDataModule(
            {"risk": ds},
            [RISK],
            tokenizer=PACKAGED_MINILM,
            text_key=text_key,
            cache_dir=str(tmp_path),
            val_fraction=0.0,
            test_fraction=0.0,
        )
        dm.setup()
        return dm.splits["train"]["risk"][0]["input_ids"]

    by_text = input_ids("text")
    assert input_ids("title") != by_text


# --- loaders ------------------------------------------------------------------------------------------


def test_heterogeneous_train_loader_yields_dicts_keyed_by_task():
    data = toy_tabular(64)
    risk = DictDataset({"x": data["x"][:40], "risk": data["risk"][:40]})
    stay = DictDataset({"x": data["x"][:20], "stay": data["stay"][:20]})
    dm = MultiTaskDataModule(
        {"risk": risk, "stay": stay},
        [RISK, STAY],
        batch_size={"risk": 8, "stay": 4},
        val_fraction=0.0,
        test_fraction=0.0,
    )
    loader = dm.train_dataloader()  # sets itself up
    assert isinstance(loader, CombinedLoader)
    batches = list(loader)
    assert len(batches) == 5  # max_size_cycle: the longest loader (40 / 8) sets the epoch
    for batch, _, _ in batches:
        assert set(batch) == {"risk", "stay"}
        assert batch["risk"]["x"].shape == (8, 8) and batch["risk"]["risk"].shape == (8,)
        assert batch["stay"]["x"].shape == (4, 8) and batch["stay"]["stay"].dtype == torch.float32
        assert "stay" not in batch["risk"]


def test_heterogeneous_min_size_mode():
    risk = DictDataset({"x": torch.zeros(40, 2), "risk": torch.zeros(40)})
    stay = DictDataset({"x": torch.zeros(8, 2), "stay": torch.zeros(8)})
    dm = MultiTaskDataModule(
        {"risk": risk, "stay": stay},
        [RISK, STAY],
        batch_size=4,
        val_fraction=0.0,
        test_fraction=0.0,
        train_mode="min_size",
    )
    assert len(list(dm.train_dataloader())) == 2


def test_single_dataset_with_missing_labels():
    n = 12
    a = [None if i % 3 == 0 else i % 2 for i in range(n)]
    b = [None if i % 4 == 1 else ["sport", "tech", "politics"][i % 3] for i in range(n)]
    c = [None if i % 5 == 2 else float(i) for i in range(n)]
    ds = Dataset.from_dict(
        {"id": list(range(n)), "x": [[float(i), 1.0] for i in range(n)], "risk": a, "topic": b, "stay": c}
    )
    dm = MultiTaskDataModule(ds, [RISK, TOPIC, STAY], batch_size=n, val_fraction=0.0, test_fraction=0.0)
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and not dm.heterogeneous
    batch = next(iter(loader))
    assert set(batch) == {"id", "x", "risk", "topic", "stay"}
    rows = {int(i): k for k, i in enumerate(batch["id"])}
    for i in range(n):
        r = rows[i]
        if a[i] is None:
            assert math.isnan(batch["risk"][r])
        else:
            assert batch["risk"][r] == a[i]
        if b[i] is None:
            assert batch["topic"][r] == IGNORE_INDEX
        else:
            assert batch["topic"][r] == TOPIC.labels.index(b[i])
        if c[i] is None:
            assert math.isnan(batch["stay"][r])
        else:
            assert batch["stay"][r] == c[i]
    assert batch["risk"].dtype == torch.float32 and batch["topic"].dtype == torch.long
    assert int(torch.isnan(batch["risk"]).sum()) == a.count(None)
    assert int((batch["topic"] == IGNORE_INDEX).sum()) == b.count(None)


def _unlabelled_probe_data(last_row: dict[str, object]) -> dict[str, object]:
    from datasets import Dataset

    rows = {"x": [[float(i)] for i in range(8)], "a": [1, None] * 4, "b": [None, 0.5] * 4}
    for key, value in last_row.items():
        rows[key][-1] = value  # type: ignore[index]
    ds = Dataset.from_dict(rows)
    return {"train": ds, "val": ds, "test": ds}


@pytest.mark.parametrize(
    ("last_row", "nonfinite", "expected"),
    [
        ({}, "raise", False),  # every row has a label for a or b
        ({"b": None}, "raise", True),  # the last row has none
        ({"b": float("nan")}, "raise", True),  # NaN is missing too
        ({}, "skip", True),  # skipping non-finite labels can empty a row
    ],
)
def test_may_yield_unlabelled_batches_single_dataset(last_row, nonfinite, expected):
    tasks = [Task("a", kind="binary"), Task("b", kind="regression")]
    dm = MultiTaskDataModule(_unlabelled_probe_data(last_row), tasks=tasks, nonfinite=nonfinite)
    assert dm.may_yield_unlabelled_batches() is expected


def test_may_yield_unlabelled_batches_per_task_reads_the_longest_dataset():
    from datasets import Dataset

    tasks = [Task("a", kind="binary"), Task("b", kind="multiclass", labels=["x", "y"])]
    long = Dataset.from_dict({"x": [[0.0]] * 20, "a": [1, 0] * 10})
    short = Dataset.from_dict({"x": [[0.0]] * 6, "b": [None] * 6})
    assert MultiTaskDataModule({"a": long, "b": short}, tasks=tasks).may_yield_unlabelled_batches() is False
    gappy = Dataset.from_dict({"x": [[0.0]] * 20, "a": [1, None] * 10})
    assert MultiTaskDataModule({"a": gappy, "b": short}, tasks=tasks).may_yield_unlabelled_batches() is True
    tokens = Dataset.from_dict({"x": [[0.0]] * 20, "a": [[-100, -100]] * 20})  # token tags: all missing
    token_task = [Task("a", kind="token", labels=["O", "B"]), tasks[1]]
    assert MultiTaskDataModule({"a": tokens, "b": short}, tasks=token_task).may_yield_unlabelled_batches()
