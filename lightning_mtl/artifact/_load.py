"""Loading: a release artifact folder or hub id, checked strictly, without unpickling anything."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import load_file

from lightning_mtl.artifact._classes import _build, _check_class_paths, _recorded_module_class
from lightning_mtl.artifact._files import _sha256_file, recover
from lightning_mtl.artifact._layout import (
    CARD_NAME,
    CONFIG_NAME,
    HUB_ID,
    LIBRARY_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    ArtifactError,
    PathLike,
)
from lightning_mtl.artifact._tensors import _check_base, _check_tensors, _read_header
from lightning_mtl.artifact.config import ArtifactConfig

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


def from_pretrained(
    directory_or_hub_id: PathLike,
    *,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    module_class: type[MultiTaskModule] | None = None,
) -> MultiTaskModule:
    """Load a release artifact from a folder or a Hugging Face Hub id; returns the module in eval mode.

    Nothing is unpickled: only ``config.json`` and ``model.safetensors`` are read, and a folder that
    offers only pickle files (``.bin``, ``.pt``, ``.ckpt``, ...) is refused. Checked, each with an
    :class:`ArtifactError` naming the file: the config parses and its schema is not newer than this
    library's; every ``class_path`` in it names an ``nn.Module`` class; the weights file parses and
    its SHA-256 matches; its tensor names equal the rebuilt module's exactly and shapes match; for
    ``trainable_only`` artifacts the base model matches the recorded fingerprint.

    Args:
        directory_or_hub_id: a local folder, or a hub id (downloaded with ``snapshot_download``;
            only ``config.json``, ``model.safetensors`` and ``README.md`` are fetched).
        map_location: device to move the module to.
        strict: with ``False``, missing or unexpected tensors and a base-model fingerprint mismatch
            are warnings instead of errors (shape mismatches and a SHA-256 mismatch stay errors).
        module_class: the class to rebuild (a ``MultiTaskModule`` subclass); default: the class recorded
            in ``config.json`` when it is part of ``lightning_mtl``, else ``MultiTaskModule`` (a class of
            yours is never imported from an artifact: call ``YourModule.from_pretrained(...)``).

    Example:
        >>> import tempfile
        >>> from lightning_mtl import MultiTaskModule, Task
        >>> from lightning_mtl.backbones import MLPBackbone
        >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression")])
        >>> from lightning_mtl.artifact import save_pretrained
        >>> loaded = from_pretrained(save_pretrained(module, Path(tempfile.mkdtemp()) / "m"))
        >>> loaded.training, list(loaded.tasks)
        (False, ['stay'])
    """
    folder = _resolve(directory_or_hub_id)
    weights_path = folder / WEIGHTS_NAME
    config_path = folder / CONFIG_NAME
    if not weights_path.is_file():
        pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(pickles[0])
    config = ArtifactConfig.read(config_path)
    if not weights_path.is_file():
        raise ArtifactError(
            weights_path, f"missing; an artifact folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    found_shapes = _read_header(weights_path)
    expected_sha = config.weights.sha256
    actual_sha = _sha256_file(weights_path)
    if actual_sha != expected_sha:
        raise ArtifactError(
            weights_path,
            f"SHA-256 mismatch: the file hashes to {actual_sha}, {CONFIG_NAME} records {expected_sha}. "
            "The file was modified or corrupted after saving; download or export it again.",
        )
    hparams = config.hparams
    _check_class_paths(hparams, config_path)
    if module_class is None:
        module_class = _recorded_module_class(config.to_dict(), config_path)
    base = config.base
    module = _build(module_class, hparams, base, config_path)

    # Tensor names of earlier layouts (e.g. ``heads.<task>.*`` before task units) map to today's.
    upgrade = getattr(module, "upgrade_state_keys", lambda names: {n: n for n in names})
    renamed = upgrade(list(found_shapes))
    found_shapes = {renamed[n]: shape for n, shape in found_shapes.items()}
    in_file = {new: old for old, new in renamed.items() if new != old}
    state = module.state_dict()
    base_names = set(base["tensors"]) if base else set()
    want = {n: tuple(t.shape) for n, t in state.items() if n not in base_names}
    _check_tensors(weights_path, want, found_shapes, strict, in_file)
    if base:
        _check_base(config_path, base, state, strict)

    tensors = {renamed[n]: t for n, t in load_file(str(weights_path), device="cpu").items()}
    tensors = {n: t for n, t in tensors.items() if n in want}
    module.load_state_dict(tensors, strict=False)  # the name sets were checked above
    return module.to(map_location).eval()


def _resolve(ref: PathLike) -> Path:
    path = Path(ref)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ArtifactError(
            path, f"is a file; pass the artifact folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    if path.is_dir() or recover(path):  # recover: a save killed between its two renames
        return path
    text = str(ref)
    if not HUB_ID.match(text) or text.startswith("."):
        raise ArtifactError(
            path, "no such directory (and not a Hugging Face Hub id of the form 'owner/name')."
        )
    from huggingface_hub import snapshot_download

    import lightning_mtl

    try:
        folder = snapshot_download(
            text,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
            library_name=LIBRARY_NAME,
            library_version=lightning_mtl.__version__,
        )
    except Exception as err:
        raise ArtifactError(
            text, f"not a local directory, and downloading it from the Hugging Face Hub failed: {err}"
        ) from err
    return Path(cast(str, folder))


def _refuse_pickle(path: Path) -> None:
    raise ArtifactError(
        path,
        f"is a pickle-based file ({path.suffix}) and release artifacts are never unpickled (unpickling can run "
        f"arbitrary code). Only {WEIGHTS_NAME} + {CONFIG_NAME} are loaded. If this is a Lightning checkpoint you "
        "trust, convert it once with lightning_mtl.hub.export_checkpoint(ckpt_path, directory).",
    )
