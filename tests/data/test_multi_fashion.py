"""The Multi-Fashion builder: the IDX reader, the composition rule on hand-made items, and on the real
Fashion-MNIST files: determinism, labels that match the composed items, masks checked pixel by pixel
against the source images, the cache, and batching."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_mtl.data import multi_fashion as mf

INSTALLED = all((mf.DEFAULT_ROOT / name).is_file() for names in mf._FILES.values() for name in names)
needs_files = pytest.mark.skipif(
    not INSTALLED, reason=f"Fashion-MNIST is not installed ({mf.INSTALL}); .ci/run installs it"
)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(">u1").tobytes()))


# --- the IDX reader ---------------------------------------------------------------------------------
def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    out = mf.read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, images)
    (tmp_path / "plain-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 5, 6]))  # not gzipped
    assert mf.read_idx(tmp_path / "plain-idx1-ubyte").tolist() == [5, 6]
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01" + bytes(8)))
    with pytest.raises(ValueError, match=r"bad\.gz: not an IDX file"):
        mf.read_idx(tmp_path / "bad.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2])))
    with pytest.raises(ValueError, match=r"short\.gz: truncated"):
        mf.read_idx(tmp_path / "short.gz")


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(
        mf.FashionMNISTNotFound, match="apt-get update && apt-get install -y dataset-fashion-mnist"
    ):
        mf.fashion_mnist("test", root=tmp_path)
    with pytest.raises(mf.FashionMNISTNotFound, match=r"t10k-images-idx3-ubyte\.gz"):
        mf.multi_fashion("test", root=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        mf.fashion_mnist("validation", root=tmp_path)


def test_a_custom_root_with_the_four_files_is_read(tmp_path):
    rng = np.random.default_rng(0)
    for split, (images_name, labels_name) in mf._FILES.items():
        n = 6 if split == "train" else 4
        write_idx(tmp_path / images_name, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / labels_name, np.arange(n) % 10)
    ds = mf.multi_fashion("train", seed=3, root=tmp_path, cache_dir=tmp_path / "cache")
    assert len(ds) == 6 and len(mf.multi_fashion("test", root=tmp_path, cache=False)) == 4
    assert ds.labels["top_left"].tolist() == list(range(6))
    assert ds.labels["bottom_right"].tolist() == mf.pairing(6, seed=3).tolist()


# --- the composition rule ---------------------------------------------------------------------------
def test_resize_samples_pixel_centres_like_pillow_nearest():
    # Pillow's NEAREST (and scipy.misc.imresize(interp="nearest"), which the papers used) samples
    # floor((i + 0.5) * 36 / 28); these are the canvas rows that survive the resize to 28.
    expected = [
        0,
        1,
        3,
        4,
        5,
        7,
        8,
        9,
        10,
        12,
        13,
        14,
        16,
        17,
        18,
        19,
        21,
        22,
        23,
        25,
        26,
        27,
        28,
        30,
        31,
        32,
        34,
        35,
    ]
    assert mf.resize_indices(36, 28).tolist() == expected


def test_compose_places_items_keeps_the_brighter_pixel_and_labels_the_owner():
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 10, 20] = 200  # top-left item only (canvas 10, 20)
    left[0, 27, 27] = 50  # overlap, left brighter: canvas (27, 27) = right's (21, 21)
    right[0, 21, 21] = 40
    left[0, 20, 20] = 30  # overlap, right brighter: canvas (20, 20) = right's (14, 14)
    right[0, 14, 14] = 90
    left[0, 7, 7] = 77  # overlap, a tie: the bottom-right item (drawn last) owns it; right's (1, 1)
    right[0, 1, 1] = 77
    right[0, 27, 27] = 255  # bottom-right item only (canvas 33, 33)
    image, mask = mf.compose(left, right, size=36)  # no resize: canvas coordinates
    assert image.shape == mask.shape == (1, 36, 36) and image.dtype == mask.dtype == np.uint8
    expected = {(10, 20): (200, 1), (27, 27): (50, 1), (20, 20): (90, 2), (7, 7): (77, 2), (33, 33): (255, 2)}
    for (r, c), (value, owner) in expected.items():
        assert (image[0, r, c], mask[0, r, c]) == (value, owner), (r, c)
    assert np.count_nonzero(image) == len(expected)  # everything else is background ...
    assert np.count_nonzero(mask) == len(expected)  # ... and labelled 0


def test_compose_resizes_image_and_mask_with_the_same_pixels():
    rng = np.random.default_rng(1)
    left, right = rng.integers(0, 3, (2, 5, 28, 28), dtype=np.uint8)  # many zeros and ties
    full_image, full_mask = mf.compose(left, right, size=36)
    image, mask = mf.compose(left, right, size=28)
    rows = mf.resize_indices(36, 28)
    np.testing.assert_array_equal(image, full_image[:, rows][:, :, rows])
    np.testing.assert_array_equal(mask, full_mask[:, rows][:, :, rows])
    assert ((mask == 0) == (image == 0)).all()
    with pytest.raises(ValueError, match="do not fit"):
        mf.compose(left, right, canvas=30)


def test_pairing_is_a_seeded_permutation():
    a = mf.pairing(1000, seed=0)
    assert sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, mf.pairing(1000, seed=0))
    assert (a != mf.pairing(1000, seed=1)).mean() > 0.9
    assert (a != mf.pairing(1000, seed=0, split="test")).mean() > 0.9


# --- the real data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources():
    return mf.fashion_mnist("test")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("multi-fashion-cache")
    return cache, mf.multi_fashion("test", seed=0, limit=400, cache_dir=cache)


def reference_canvas(item_tl: np.ndarray, item_br: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The composition written out pixel by pixel, independently of ``compose``."""
    rows = [int((i + 0.5) * 36 / 28) for i in range(28)]
    image = np.zeros((28, 28), np.uint8)
    mask = np.zeros((28, 28), np.uint8)
    for y, r in enumerate(rows):
        for x, c in enumerate(rows):
            tl = int(item_tl[r, c]) if r < 28 and c < 28 else 0
            br = int(item_br[r - 6, c - 6]) if 6 <= r < 34 and 6 <= c < 34 else 0
            image[y, x] = max(tl, br)
            mask[y, x] = 0 if max(tl, br) == 0 else (2 if br >= tl else 1)
    return image, mask


@needs_files
def test_labels_and_masks_match_the_source_images(built, sources):
    _, ds = built
    images, labels = sources
    assert len(ds) == 400
    tl, br = ds.sources["top_left"].numpy(), ds.sources["bottom_right"].numpy()
    np.testing.assert_array_equal(tl, np.arange(400))
    np.testing.assert_array_equal(ds.labels["top_left"].numpy(), labels[tl])
    np.testing.assert_array_equal(ds.labels["bottom_right"].numpy(), labels[br])
    assert (
        len(set(zip(ds.labels["top_left"].tolist(), ds.labels["bottom_right"].tolist()))) > 50
    )  # independent
    for i in range(0, 400, 37):
        image, mask = reference_canvas(images[tl[i]], images[br[i]])
        np.testing.assert_array_equal(ds.images[i].numpy(), image, err_msg=f"canvas {i}")
        np.testing.assert_array_equal(ds.masks[i].numpy(), mask, err_msg=f"mask {i}")
    counts = np.bincount(ds.masks.numpy().ravel(), minlength=3) / ds.masks.numel()
    assert all(0.15 < c < 0.7 for c in counts), counts  # both items and the background are well present


@needs_files
def test_build_is_deterministic_cached_and_prefix_stable(built, tmp_path):
    cache, ds = built
    path = mf.cache_path("test", 0, 28, 400, cache)
    assert path.is_file()
    again = mf.build("test", seed=0, limit=400)
    np.testing.assert_array_equal(ds.images.numpy(), again["image"])
    np.testing.assert_array_equal(ds.masks.numpy(), again["segmentation"])
    np.testing.assert_array_equal(ds.labels["bottom_right"].numpy(), again["bottom_right"])
    head = mf.multi_fashion("test", seed=0, limit=100, cache=False)
    np.testing.assert_array_equal(head.images.numpy(), ds.images[:100].numpy())  # a slice is a prefix
    other = mf.multi_fashion("test", seed=1, limit=400, cache=False)
    assert (other.sources["bottom_right"] != ds.sources["bottom_right"]).float().mean() > 0.9
    path.write_bytes(b"not an npz file")  # a damaged cache file is rebuilt and rewritten
    rebuilt = mf.multi_fashion("test", seed=0, limit=400, cache_dir=cache)
    assert torch.equal(rebuilt.images, ds.images) and path.stat().st_size > 100_000


@needs_files
def test_dataset_returns_batches_and_examples(built):
    _, ds = built
    batch = ds[[3, 1, 4]]
    assert batch["image"].shape == (3, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["segmentation"].shape == (3, 28, 28) and batch["segmentation"].dtype == torch.long
    assert torch.equal(batch["image"][1, 0], ds.images[1].float() / 255)
    assert torch.equal(batch["top_left"], ds.labels["top_left"][[3, 1, 4]])
    one = ds[4]
    assert one["image"].shape == (1, 28, 28) and one["top_left"].dim() == 0
    assert torch.equal(ds[torch.tensor([2, 0])]["segmentation"], ds.masks[[2, 0]].long())
    part = ds.select([5, 7])
    assert len(part) == 2 and torch.equal(part[0]["image"], ds[5]["image"])
    assert part.sources["bottom_right"].tolist() == ds.sources["bottom_right"][[5, 7]].tolist()
