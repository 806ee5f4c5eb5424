"""``config.json`` as one typed record, read and checked once, shared by loading and the zoo.

``config.json`` (schema version :data:`SCHEMA_VERSION`) holds everything needed to rebuild the module
without downloading pretrained weights: ``schema_version``, ``library`` (name, version), ``module_class``,
``hparams`` (the module's hyper-parameters: backbone spec with the architecture config, tasks, balancer,
...), ``preprocessing`` (tokenizer reference, ``max_length``, input keys), ``metrics`` per task, ``card``
(license, datasets, training data, recipe, intended use, limitations, ...), ``weights`` (file, SHA-256,
tensor names, dtype, size), ``base`` (``null``, or for ``trainable_only`` artifacts the reference and
fingerprint of the pretrained weights that are not stored) and ``extra``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lightning_mtl.artifact._layout import (
    LIBRARY_NAME,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    ArtifactError,
    PathLike,
)


@dataclass(frozen=True)
class WeightsRecord:
    """``config.json``'s ``weights``: the file, its SHA-256 and size, its dtype and tensor names."""

    file: str
    sha256: str
    bytes: int | None = None
    dtype: str | None = None
    tensors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``config.json``."""
        return {
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "dtype": self.dtype,
            "tensors": list(self.tensors),
        }


@dataclass(frozen=True)
class ArtifactConfig:
    """A release artifact's ``config.json``, checked as loading needs it.

    :meth:`read` refuses, with an :class:`ArtifactError` naming the file: a missing file, invalid JSON,
    no ``schema_version`` (a transformers config is recognised), a schema newer than this library reads
    (naming the version to install), another writer library, a ``weights`` record other than
    ``model.safetensors`` with a SHA-256, ``hparams`` that is not an object and a malformed ``base``.
    Fields a loader does not need (``metrics``, ``card``, ...) default to empty.

    Example:
        >>> config = ArtifactConfig.from_dict(
        ...     {"schema_version": 1, "hparams": {}, "weights": {"file": "model.safetensors", "sha256": "ab"}},
        ...     "config.json",
        ... )
        >>> config.weights.sha256, config.base, config.to_dict()["library"]["name"]
        ('ab', None, 'lightning-mtl')
    """

    schema_version: int
    hparams: dict[str, Any]
    weights: WeightsRecord
    library: dict[str, Any] = field(default_factory=lambda: {"name": LIBRARY_NAME})
    module_class: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: PathLike) -> ArtifactConfig:
        """Read and check the ``config.json`` at ``path``."""
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: PathLike) -> ArtifactConfig:
        """Check a parsed ``config.json`` (``path`` names it in errors) and type it."""
        import lightning_mtl

        if "schema_version" not in config:
            hint = (
                " (it looks like a transformers model config: load that folder with HFEncoder)"
                if "model_type" in config
                else ""
            )
            raise ArtifactError(
                path, f"has no 'schema_version'; it is not a {LIBRARY_NAME} artifact config{hint}."
            )
        version = config["schema_version"]
        writer = config.get("library") or {}
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(path, f"schema_version must be a positive integer, got {version!r}.")
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                path,
                f"schema_version {version} is newer than this {LIBRARY_NAME} {lightning_mtl.__version__} reads "
                f"(up to {SCHEMA_VERSION}). The artifact was written by {writer.get('name', LIBRARY_NAME)} "
                f"{writer.get('version', '?')}: upgrade with `pip install -U '{LIBRARY_NAME}>={writer.get('version', '?')}'`.",
            )
        if writer.get("name", LIBRARY_NAME) != LIBRARY_NAME:
            raise ArtifactError(path, f"was written by {writer.get('name')!r}, not {LIBRARY_NAME}.")
        if _require(config, path, "weights", "file") != WEIGHTS_NAME:
            raise ArtifactError(
                path, f"weights.file must be {WEIGHTS_NAME!r}, got {config['weights']['file']!r}."
            )
        weights = config["weights"]
        sha256 = _require(config, path, "weights", "sha256")
        hparams = _require(config, path, "hparams")
        if not isinstance(hparams, dict):
            raise ArtifactError(path, f"'hparams' must be an object, got {type(hparams).__name__}.")
        base = config.get("base")
        if base and (not isinstance(base, dict) or not {"ref", "fingerprint", "tensors"} <= set(base)):
            raise ArtifactError(path, "'base' must hold 'ref', 'fingerprint' and 'tensors'.")
        module_class = config.get("module_class")
        return cls(
            schema_version=version,
            hparams=hparams,
            weights=WeightsRecord(
                file=WEIGHTS_NAME,
                sha256=sha256,
                bytes=weights.get("bytes"),
                dtype=weights.get("dtype"),
                tensors=tuple(weights.get("tensors") or ()),
            ),
            library={"name": LIBRARY_NAME, **(writer if isinstance(writer, dict) else {})},
            module_class=module_class if isinstance(module_class, str) else None,
            preprocessing=_object(config.get("preprocessing")),
            metrics=_object(config.get("metrics")),
            card=_object(config.get("card")),
            base=base or None,
            extra=_object(config.get("extra")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as ``config.json`` (keys in the documented order)."""
        return {
            "schema_version": self.schema_version,
            "library": dict(self.library),
            "module_class": self.module_class,
            "hparams": self.hparams,
            "preprocessing": self.preprocessing,
            "metrics": self.metrics,
            "card": self.card,
            "weights": self.weights.to_dict(),
            "base": self.base,
            "extra": self.extra,
        }

    def to_json(self) -> str:
        """``config.json``'s text: indented JSON, no NaN or infinity."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def read_json(path: PathLike) -> dict[str, Any]:
    """The JSON object in the ``config.json`` at ``path``; the one reader of that file.

    Example:
        >>> try:
        ...     read_json("no/such/config.json")
        ... except ArtifactError as err:
        ...     print(err.problem)
        missing; this folder is not a lightning-mtl release artifact.
    """
    file = Path(path)
    if not file.is_file():
        raise ArtifactError(file, f"missing; this folder is not a {LIBRARY_NAME} release artifact.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(file, f"is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ArtifactError(file, f"must hold a JSON object, got {type(config).__name__}.")
    return config


def _require(config: dict[str, Any], path: PathLike, *keys: str) -> Any:
    value: Any = config
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(path, f"lacks '{'.'.join(keys[: i + 1])}'.")
        value = value[key]
    return value


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json_able(value: dict[str, Any], what: str) -> dict[str, Any]:
    """``value`` as plain JSON values; a value that is not JSON-serialisable is refused, naming its key."""
    for key, item in value.items():
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{what} {key!r} is not JSON-serialisable ({err}); config.json stores only JSON values. "
                "Pass a name, a number, a list/dict of those, or a {'class_path', 'init_args'} spec."
            ) from None
    return cast(dict[str, Any], json.loads(json.dumps(value)))
