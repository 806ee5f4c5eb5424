"""The zoo registry: named release artifacts, discovered lazily from zoo folders, plus user entries.

Entries come from the ``zoo/`` folder of a source checkout, the folders listed in the
``LIGHTNING_MTL_ZOO`` environment variable (``os.pathsep``-separated) and :func:`register_model`.
Each subfolder of a zoo folder that holds a ``config.json`` is one entry, named after the subfolder
(see :mod:`lightning_mtl.hub` for the artifact layout). The folders are scanned on every call (a few
``stat`` calls), so entries added on disk or a changed environment variable are seen at once.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning_mtl
from lightning_mtl.artifact import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    ArtifactConfig,
    ArtifactError,
    from_pretrained,
)
from lightning_mtl.artifact._files import recover
from lightning_mtl.artifact._layout import HUB_ID as _HUB_ID
from lightning_mtl.artifact._tensors import _read_header

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule

ENV_VAR = "LIGHTNING_MTL_ZOO"
"""Extra zoo folders, separated by ``os.pathsep``."""

_NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")
_USER: dict[str, ZooEntry] = {}

Ref = str | os.PathLike[str]


class UnknownModelError(KeyError):
    """A name that is neither a zoo entry nor a folder; the message lists the entries."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ZooEntry:
    """One model: its name, where the artifact lives (a folder or a hub id) and where the entry came from.

    ``source`` is ``"repo"`` (the checkout's ``zoo/``), ``"env"`` (``$LIGHTNING_MTL_ZOO``), ``"user"``
    (:func:`register_model`), or ``"path"`` / ``"hub"`` for a folder or hub id given directly;
    ``remote`` is true when ``ref`` is a hub id.
    """

    name: str
    ref: str
    source: str
    description: str | None = None
    remote: bool = False

    @property
    def folder(self) -> Path | None:
        """The local artifact folder, or ``None`` for a hub id."""
        return None if self.remote else Path(self.ref)

    @property
    def has_weights(self) -> bool | None:
        """Whether ``model.safetensors`` is present; ``None`` for a hub id (not checked without a download)."""
        folder = self.folder
        return None if folder is None else (folder / WEIGHTS_NAME).is_file()

    def config(self) -> dict[str, Any]:
        """The parsed ``config.json`` as JSON (for a hub id, only that file is downloaded)."""
        return self.artifact_config().to_dict()

    def artifact_config(self) -> ArtifactConfig:
        """The entry's ``config.json``, checked as loading checks it (for a hub id, only that file is downloaded)."""
        folder = self.folder
        if folder is not None:
            return ArtifactConfig.read(folder / CONFIG_NAME)
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(self.ref, CONFIG_NAME, library_name="lightning-mtl")
        except Exception as err:
            raise ArtifactError(
                self.ref,
                f"not a local folder, and fetching its {CONFIG_NAME} from the Hugging Face Hub failed: {err}",
            ) from err
        return ArtifactConfig.read(Path(path))


# --- where entries come from -----------------------------------------------------------------------
def repo_zoo_dir() -> Path | None:
    """The ``zoo/`` folder of the source checkout this package runs from, or ``None`` when installed."""
    root = Path(lightning_mtl.__file__).resolve().parents[1]
    folder = root / "zoo"
    return folder if folder.is_dir() and (root / "pyproject.toml").is_file() else None


def zoo_dirs() -> list[Path]:
    """The folders scanned for entries: the checkout's ``zoo/`` (if any), then ``$LIGHTNING_MTL_ZOO``.

    Example:
        >>> all(folder.is_dir() for folder in zoo_dirs())
        True
    """
    dirs: list[Path] = []
    repo = repo_zoo_dir()
    if repo is not None:
        dirs.append(repo)
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if not part.strip():
            continue
        folder = Path(part).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"${ENV_VAR} lists {part!r}, which is not a directory. Fix the variable (folders separated "
                f"by {os.pathsep!r}) or create the folder."
            )
        dirs.append(folder)
    unique: dict[Path, Path] = {}
    for folder in dirs:
        unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def _discover() -> dict[str, ZooEntry]:
    """Every entry by name; the same name twice (two folders, or a folder and a user entry) raises."""
    entries: dict[str, ZooEntry] = {}
    repo = repo_zoo_dir()
    for folder in zoo_dirs():
        source = "repo" if repo is not None and folder.resolve() == repo.resolve() else "env"
        for sub in sorted(folder.iterdir()):
            if sub.name.startswith((".", "_")) or not (sub / CONFIG_NAME).is_file():
                continue  # hidden folders include save_pretrained's temporary ones
            _add(entries, ZooEntry(sub.name, str(sub), source))
    for entry in _USER.values():
        _add(entries, entry)
    return entries


def _add(entries: dict[str, ZooEntry], entry: ZooEntry) -> None:
    if entry.name in entries:
        first = entries[entry.name]
        raise ValueError(
            f"Two zoo entries are named {entry.name!r}: {first.source} {first.ref} and {entry.source} "
            f"{entry.ref}. Rename one of them (an entry's name is its folder name), or remove a folder "
            f"from ${ENV_VAR}."
        )
    entries[entry.name] = entry


# --- the public API -----------------------------------------------------------------------------------
def list_models(filter: str | None = None) -> list[str]:
    """Sorted names of the zoo entries, optionally those matching an ``fnmatch`` pattern.

    Example:
        >>> list_models("no-such-model-*")
        []
    """
    names = sorted(_discover())
    return [n for n in names if filter is None or fnmatch.fnmatch(n, filter)]


def get_entry(name_or_ref: Ref | ZooEntry) -> ZooEntry:
    """The entry for a registered name, a local artifact folder, or a Hugging Face Hub id.

    A bare name (no path separator) is looked up in the zoo first; a name that is also a folder in
    the working directory is ambiguous and refused (pass ``./name`` for the folder).
    """
    if isinstance(name_or_ref, ZooEntry):
        return name_or_ref
    text = os.fspath(name_or_ref)
    path = Path(text)
    bare = isinstance(name_or_ref, str) and "/" not in text and os.sep not in text and text not in (".", "..")
    if bare:
        entries = _discover()
        if text in entries:
            entry = entries[text]
            if path.is_dir() and entry.folder is not None and path.resolve() != entry.folder.resolve():
                raise ValueError(
                    f"{text!r} is both a zoo entry ({entry.ref}) and a folder in the working directory. "
                    f"Pass './{text}' for the folder, or run from another directory for the zoo entry."
                )
            return entry
        if path.is_dir():
            return ZooEntry(path.name, str(path), "path")
        raise UnknownModelError(_unknown_message(text, sorted(entries)))
    if path.is_dir() or recover(path):  # recover: a save killed between its two renames
        return ZooEntry(path.resolve().name, str(path), "path")
    if isinstance(name_or_ref, str) and _HUB_ID.match(text) and not text.startswith("."):
        return ZooEntry(text, text, "hub", remote=True)
    raise ArtifactError(path, "no such directory (and not a Hugging Face Hub id of the form 'owner/name').")


def _unknown_message(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    dirs = ", ".join(str(d) for d in zoo_dirs()) or "none"
    available = f"Zoo entries: {names}." if names else "The zoo is empty."
    return (
        f"Unknown model {name!r}: not a zoo entry and not a folder.{hint} {available} Folders scanned: {dirs} "
        f"(add more with ${ENV_VAR}). A Hugging Face Hub id has the form 'owner/name'."
    )


def register_model(name: str, ref: Ref, *, description: str | None = None) -> ZooEntry:
    """Add a user entry: ``name`` for an artifact folder or a Hugging Face Hub id (``owner/name``).

    Raises ``ValueError`` if an entry of that name already exists (from any source).

    Example:
        >>> import tempfile
        >>> from lightning_mtl import MultiTaskModule, Task
        >>> from lightning_mtl.backbones import MLPBackbone
        >>> from lightning_mtl.hub import save_pretrained
        >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression")])
        >>> folder = save_pretrained(module, Path(tempfile.mkdtemp()) / "stay", card={"license": "mit"})
        >>> entry = register_model("doctest-stay", folder, description="Length of stay")
        >>> list_models("doctest-*"), describe("doctest-stay")["description"]
        (['doctest-stay'], 'Length of stay')
        >>> load("doctest-stay").training
        False
        >>> unregister_model("doctest-stay")
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"A zoo model name must start with a letter or digit and hold only letters, digits, '.', '_', "
            f"'+' and '-'; got {name!r}."
        )
    text = os.fspath(ref)
    path = Path(text)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ArtifactError(path, f"holds no {CONFIG_NAME}; it is not a release artifact folder.")
        entry = ZooEntry(name, str(path.resolve()), "user", description)
    elif isinstance(ref, str) and "/" in text and _HUB_ID.match(text) and not text.startswith("."):
        entry = ZooEntry(name, text, "user", description, remote=True)
    else:
        raise ArtifactError(
            path, "no such directory (and not a Hugging Face Hub id of the form 'owner/name')."
        )
    existing = _discover().get(name)
    if existing is not None:
        raise ValueError(
            f"A zoo model named {name!r} already exists ({existing.source} entry at {existing.ref}). "
            f"Pick another name, or unregister_model({name!r}) first if it is yours."
        )
    _USER[name] = entry
    return entry


def unregister_model(name: str) -> None:
    """Remove a user entry added with :func:`register_model` (entries from zoo folders stay)."""
    if name not in _USER:
        raise UnknownModelError(
            f"{name!r} is not a user entry; user entries: {sorted(_USER)}. Entries from zoo folders are "
            "removed by deleting (or moving) their folder."
        )
    del _USER[name]


def describe(name_or_ref: Ref | ZooEntry) -> dict[str, Any]:
    """A JSON-able summary of an entry: card, tasks, metrics, size, parameters, where it lives.

    ``parameters`` counts the stored tensor elements (parameters and buffers, plus the frozen base
    tensors of a ``trainable_only`` artifact); it is ``None`` when the weights file is not present.
    """
    entry = get_entry(name_or_ref)
    config = entry.artifact_config()
    card = config.card
    base = config.base
    tasks = config.hparams.get("tasks") or []
    folder = entry.folder
    return {
        "name": entry.name,
        "description": entry.description or card.get("description"),
        "source": entry.source,
        "ref": entry.ref,
        "path": str(folder.resolve()) if folder is not None else None,
        "weights_present": entry.has_weights,
        "tasks": [{"name": t.get("name"), "kind": t.get("kind"), "labels": t.get("labels")} for t in tasks],
        "metrics": config.metrics,
        "size_bytes": config.weights.bytes,
        "parameters": _count_parameters(entry, base),
        "dtype": config.weights.dtype,
        "license": card.get("license"),
        "datasets": card.get("datasets") or [],
        "recipe": card.get("recipe"),
        "training_data": card.get("training_data"),
        "intended_use": card.get("intended_use"),
        "limitations": card.get("limitations"),
        "tags": card.get("tags") or [],
        "language": card.get("language") or [],
        "base": base.get("ref") if isinstance(base, dict) else None,
        "library_version": config.library.get("version"),
    }


def _count_parameters(entry: ZooEntry, base: Any) -> int | None:
    if not entry.has_weights or entry.folder is None:
        return None
    shapes = list(_read_header(entry.folder / WEIGHTS_NAME).values())
    if isinstance(base, dict):
        shapes += [tuple(t["shape"]) for t in (base.get("tensors") or {}).values()]
    return sum(math.prod(shape) for shape in shapes)


def load(name_or_ref: Ref | ZooEntry, **kwargs: Any) -> MultiTaskModule:
    """Load a zoo entry, an artifact folder or a hub id with :func:`lightning_mtl.hub.from_pretrained`
    (``kwargs``: ``map_location``, ``strict``, ``module_class``); the module is in eval mode.

    An entry whose ``model.safetensors`` is not present raises an :class:`~lightning_mtl.hub.ArtifactError`
    naming the recipe that produces it.
    """
    entry = get_entry(name_or_ref)
    folder = entry.folder
    if (
        folder is not None
        and folder.is_dir()
        and not (folder / WEIGHTS_NAME).is_file()
        and not any(p.suffix.lower() in PICKLE_SUFFIXES for p in folder.iterdir())  # hub explains those
    ):
        raise ArtifactError(folder / WEIGHTS_NAME, _missing_weights_message(entry))
    return from_pretrained(entry.ref, **kwargs)


def _missing_weights_message(entry: ZooEntry) -> str:
    try:
        recipe = entry.artifact_config().card.get("recipe")
    except ArtifactError:
        recipe = None
    if isinstance(recipe, dict):
        recipe = recipe.get("command") or json.dumps(recipe, sort_keys=True)
    if not recipe:
        return (
            f"missing: the weights of {entry.name!r} are not present and its {CONFIG_NAME} names no recipe "
            "(card.recipe) that produces them. Copy the complete artifact folder, or export it again."
        )
    return (
        f"missing: the weights of {entry.name!r} are not shipped; they are produced by its recipe: {recipe}. "
        f"Run the recipe (it writes {WEIGHTS_NAME} into {entry.folder}), then load again."
    )
