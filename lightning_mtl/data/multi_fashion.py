"""Multi-Fashion (Sener & Koltun 2018; Lin et al. 2019) from the Debian ``dataset-fashion-mnist`` files.

Each example is one canvas with two Fashion-MNIST items: the *top-left* item drawn at rows/columns
``0:28`` of a 36x36 canvas and the *bottom-right* item at ``6:34`` (the placement of Sener & Koltun's
MultiMNIST code, which Lin et al. reuse for Multi-Fashion), where they overlap the brighter pixel is
kept (``max``), and the canvas is resized to 28x28 by nearest-neighbour sampling, as in both papers.
Three labels per canvas:

* ``top_left`` and ``bottom_right``: the Fashion-MNIST class of each item (:data:`FASHION_LABELS`);
* ``segmentation``: a per-pixel class map, exact because the canvas is composed:
  0 = background (neither item has ink there), 1 = the top-left item, 2 = the bottom-right item.
  A pixel belongs to the item whose intensity is the visible one (the larger, since the canvas keeps
  the ``max``); on a tie the bottom-right item, drawn last, wins. The map is sampled with the same
  nearest-neighbour indices as the image, so every map pixel describes exactly the image pixel it
  sits on.

Pairing follows the papers: every image of a split is the top-left item of one canvas, and a seeded
random permutation of the same split gives the bottom-right partners (so each image is used once in
each place; the classes are independent). Train canvases come from Fashion-MNIST's 60,000 training
images, test canvases from its 10,000 ``t10k`` images. The build is deterministic given
``(split, seed, size)`` and is cached as an ``.npz`` file (see :func:`multi_fashion`).

The four IDX files ship in the Debian package ``dataset-fashion-mnist`` (Zalando, MIT):
``apt-get update && apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` puts the IDX files."""

INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
"""How to install the files (as root; 31 MB)."""

FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
"""Fashion-MNIST class names, by label id."""

SEGMENT_LABELS = ["background", "top_left", "bottom_right"]
"""The classes of the ``segmentation`` map."""

TASK_KEYS = ("top_left", "bottom_right", "segmentation")
"""The label keys of every example, besides the ``image``."""

CANVAS = 36
"""Side of the composition canvas."""
OFFSET = 6
"""Row and column where the bottom-right item starts on the canvas."""
SIZE = 28
"""Side of the final images (the papers' resize)."""

VERSION = 1
"""Bump when the composition changes, so cached files of the old one are not reused."""

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SEED_OFFSET = {"train": 0, "test": 7919}  # train and test pairings use different streams of `seed`


class FashionMNISTNotFound(FileNotFoundError):
    """The Fashion-MNIST IDX files are absent; the message says how to install them."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed when the name ends in ``.gz``).

    Example:
        >>> import gzip, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
        >>> _ = path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9])))
        >>> read_idx(path)
        array([7, 2, 9], dtype=uint8)
    """
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0":
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()}).")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: truncated or corrupt, {len(body)} data bytes for shape {shape}.")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``split`` (``train``: 60,000,
    ``test``: the 10,000 ``t10k`` images), read from ``root`` (default: the Debian package's folder).

    Example:
        >>> images, labels = fashion_mnist("test")  # doctest: +SKIP
        >>> images.shape, FASHION_LABELS[labels[0]]  # doctest: +SKIP
        ((10000, 28, 28), 'Ankle boot')
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = Path(root) if root is not None else DEFAULT_ROOT
    paths = [folder / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FashionMNISTNotFound(
            f"Fashion-MNIST is not installed: {', '.join(missing)} not found. Install the Debian package "
            f"(31 MB, as root): `{INSTALL}`; or pass root=<a folder with the four IDX .gz files of "
            "https://github.com/zalandoresearch/fashion-mnist>."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match.")
    return images.astype(np.uint8), labels.astype(np.int64)


def resize_indices(canvas: int = CANVAS, size: int = SIZE) -> np.ndarray:
    """The canvas rows (and columns) that nearest-neighbour resizing to ``size`` samples (pixel centres,
    as Pillow's ``NEAREST``).

    Example:
        >>> resize_indices(36, 28)[:8].tolist()
        [0, 1, 3, 4, 5, 7, 8, 9]
        >>> resize_indices(36, 36).tolist() == list(range(36))
        True
    """
    return np.minimum(((np.arange(size) + 0.5) * canvas / size).astype(np.int64), canvas - 1)


def compose(
    top_left: np.ndarray,
    bottom_right: np.ndarray,
    *,
    canvas: int = CANVAS,
    offset: int = OFFSET,
    size: int = SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Compose pairs of items ``uint8 [N, h, w]`` into canvases; return ``(images, masks)``, both
    ``uint8 [N, size, size]``; mask values: 0 background, 1 top-left item, 2 bottom-right item.

    Example:
        >>> a = np.zeros((1, 2, 2), np.uint8); a[0, 1, 1] = 9    # the top-left item's ink at (1, 1)
        >>> b = np.full((1, 2, 2), 5, np.uint8)                   # the bottom-right item covers its 2x2
        >>> image, mask = compose(a, b, canvas=3, offset=1, size=3)
        >>> image[0].tolist(), mask[0].tolist()
        ([[0, 0, 0], [0, 9, 5], [0, 5, 5]], [[0, 0, 0], [0, 1, 2], [0, 2, 2]])
    """
    if top_left.shape != bottom_right.shape or top_left.ndim != 3:
        raise ValueError(
            f"expected two [N, h, w] arrays of one shape, got {top_left.shape} and {bottom_right.shape}."
        )
    n, h, w = top_left.shape
    if offset + h > canvas or offset + w > canvas:
        raise ValueError(f"items of {h}x{w} at offset {offset} do not fit a {canvas}x{canvas} canvas.")
    first = np.zeros((n, canvas, canvas), np.uint8)
    second = np.zeros((n, canvas, canvas), np.uint8)
    first[:, :h, :w] = top_left
    second[:, offset : offset + h, offset : offset + w] = bottom_right
    rows = resize_indices(canvas, size)
    first = first[:, rows][:, :, rows]
    second = second[:, rows][:, :, rows]
    image = np.maximum(first, second)
    mask = np.where(second >= first, 2, 1).astype(np.uint8)
    mask[image == 0] = 0
    return image, mask


def pairing(n: int, seed: int, split: str = "train") -> np.ndarray:
    """The bottom-right partner of each top-left image ``i`` of a split of ``n`` images: a permutation
    drawn from ``seed`` (train and test use different streams of it).

    Example:
        >>> pairing(5, seed=0).tolist() == pairing(5, seed=0).tolist()
        True
        >>> sorted(pairing(5, seed=0).tolist())
        [0, 1, 2, 3, 4]
    """
    rng = np.random.default_rng([int(seed), _SEED_OFFSET.get(split, 0), VERSION])
    return rng.permutation(n)


def build(
    split: str = "train",
    seed: int = 0,
    *,
    size: int = SIZE,
    limit: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """Compose the Multi-Fashion canvases of ``split`` (no cache): ``image`` and ``segmentation``
    (``uint8 [N, size, size]``), ``top_left`` and ``bottom_right`` (class ids), and the Fashion-MNIST
    indices of both items (``source_top_left``, ``source_bottom_right``). ``limit`` composes only the
    first ``limit`` canvases, which are exactly the first ``limit`` of the full build."""
    images, labels = fashion_mnist(split, root)
    second = pairing(len(images), seed, split)
    if limit is not None:
        second = second[: max(int(limit), 0)]
    first = np.arange(len(second))
    image, mask = compose(images[first], images[second], size=size)
    return {
        "image": image,
        "segmentation": mask,
        "top_left": labels[first],
        "bottom_right": labels[second],
        "source_top_left": first,
        "source_bottom_right": second,
    }


def default_cache_dir() -> Path:
    """``$LIGHTNING_MTL_CACHE/multi_fashion``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``lightning_mtl/multi_fashion``."""
    base = os.environ.get("LIGHTNING_MTL_CACHE")
    if base:
        return Path(base).expanduser() / "multi_fashion"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "lightning_mtl" / "multi_fashion"


def cache_path(
    split: str,
    seed: int,
    size: int,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The cache file of one build, keyed by composition version, split, seed, image size and count."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    count = "all" if limit is None else f"n{int(limit)}"
    return folder / f"multi_fashion-v{VERSION}-{split}-seed{seed}-{CANVAS}o{OFFSET}to{size}-{count}.npz"


class MultiFashion(Dataset):
    """Multi-Fashion canvases in memory. ``ds[i]`` is one example, ``ds[[i, j, ...]]`` (or a tensor of
    indices) a whole batch: ``image`` (float ``[1, H, W]`` in ``[0, 1]``, batched ``[B, 1, H, W]``),
    ``top_left`` and ``bottom_right`` (class ids), ``segmentation`` (``[H, W]`` class ids).

    A ``DataLoader(ds, batch_size=..., collate_fn=keep_batch)`` slices whole batches at once (through
    ``__getitems__``) instead of collating examples one by one; it stays an ordinary loader, so
    Lightning can still give it a distributed sampler.

    Example:
        >>> ds = MultiFashion({k: np.zeros((5, 28, 28) if k in ("image", "segmentation") else 5, np.uint8)
        ...                    for k in ("image", "segmentation", "top_left", "bottom_right",
        ...                              "source_top_left", "source_bottom_right")})
        >>> from torch.utils.data import DataLoader
        >>> batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=keep_batch)))
        >>> batch["image"].shape, batch["segmentation"].shape, batch["top_left"].tolist()
        (torch.Size([4, 1, 28, 28]), torch.Size([4, 28, 28]), [0, 0, 0, 0])
    """

    def __init__(self, arrays: dict[str, np.ndarray], split: str = "train", seed: int = 0) -> None:
        self.split, self.seed = split, seed
        self.images = torch.from_numpy(np.ascontiguousarray(arrays["image"]))
        self.masks = torch.from_numpy(np.ascontiguousarray(arrays["segmentation"]))
        self.labels = {
            k: torch.from_numpy(np.asarray(arrays[k], np.int64)) for k in ("top_left", "bottom_right")
        }
        self.sources = {
            k: torch.from_numpy(np.asarray(arrays[f"source_{k}"], np.int64))
            for k in ("top_left", "bottom_right")
        }

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int | Sequence[int] | Tensor) -> dict[str, Tensor]:
        single = isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.dim() == 0)
        idx = torch.as_tensor([int(index)] if single else index, dtype=torch.long)  # type: ignore[arg-type]
        batch = {
            "image": self.images[idx].unsqueeze(1).float().div_(255.0),
            "top_left": self.labels["top_left"][idx],
            "bottom_right": self.labels["bottom_right"][idx],
            "segmentation": self.masks[idx].long(),
        }
        return {k: v[0] for k, v in batch.items()} if single else batch

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """A whole batch at once (what ``DataLoader`` asks for when the dataset has this method)."""
        return self[list(indices)]

    def select(self, indices: Sequence[int] | np.ndarray | Tensor) -> MultiFashion:
        """A new dataset with the examples at ``indices`` (e.g. a train/validation split)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        arrays = {
            "image": self.images[idx].numpy(),
            "segmentation": self.masks[idx].numpy(),
            **{k: v[idx].numpy() for k, v in self.labels.items()},
            **{f"source_{k}": v[idx].numpy() for k, v in self.sources.items()},
        }
        return MultiFashion(arrays, self.split, self.seed)


def keep_batch(batch: Any) -> Any:
    """The ``collate_fn`` for :class:`MultiFashion`: its ``__getitems__`` already returns the batch."""
    return batch


def multi_fashion(
    split: str = "train",
    seed: int = 0,
    *,
    size: int = SIZE,
    limit: int | None = None,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> MultiFashion:
    """The Multi-Fashion canvases of ``split`` (``train``: 60,000, ``test``: 10,000), composed with
    ``seed``; built once, then read from an ``.npz`` file under ``cache_dir`` (default
    :func:`default_cache_dir`) keyed by version, split, seed, size and ``limit``.

    ``limit`` keeps the first ``limit`` canvases (a prefix of the full build: same pairs, same
    pixels; sliced from a cached full build when there is one). ``size`` 28 follows the papers; 36
    keeps the canvas unresized.

    Example:
        >>> test = multi_fashion("test", seed=0)  # doctest: +SKIP
        >>> batch = test[[0, 1]]  # doctest: +SKIP
        >>> batch["image"].shape, batch["segmentation"].shape  # doctest: +SKIP
        (torch.Size([2, 1, 28, 28]), torch.Size([2, 28, 28]))
    """
    if not 1 <= size <= CANVAS:
        raise ValueError(f"size must be between 1 and {CANVAS}, got {size}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of canvases or None, got {limit}.")
    arrays: dict[str, np.ndarray] | None = None
    if cache:
        for candidate in dict.fromkeys([limit, None]):
            arrays = _load(cache_path(split, seed, size, candidate, cache_dir))
            if arrays is not None:
                break
    if arrays is None:
        arrays = build(split, seed, size=size, limit=limit, root=root)
        if cache:
            _save_atomic(cache_path(split, seed, size, limit, cache_dir), arrays)
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    return MultiFashion(arrays, split, seed)


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """A cached build, or ``None`` when absent or unreadable (then it is rebuilt and rewritten)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npz")
    try:
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
