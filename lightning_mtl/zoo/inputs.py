"""Raw inputs for a zoo model, built from its ``config.json``: texts, a CSV file's rows, or images.

Settings are read from ``config["preprocessing"]``, else ``config["extra"]`` (which
:func:`~lightning_mtl.hub.save_pretrained` lets you fill): ``feature_names`` (CSV columns, in the
model's order), ``image_mode`` (Pillow mode, default ``"RGB"``), ``image_size`` (``[height, width]``
or one int), ``mean`` and ``std`` (per channel, applied after scaling to ``[0, 1]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_mtl.specs import resolve_class

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """Inputs this model cannot take (wrong kind, missing file, bad columns); the message says why."""


def read_inputs(
    config: dict[str, Any], inputs: list[str], *, model: str | None = None
) -> tuple[list[str], Any]:
    """Turn command-line inputs into ``(a label per example, what module.predict takes)``.

    ``inputs`` are texts (for a backbone with ``preprocess``), one CSV file (tabular models: its
    numeric feature columns, chosen by ``feature_names`` when the config records them; for a backbone
    whose ``input_kind`` is ``"table"``, its rows as a DataFrame, which the backbone's ``preprocess``
    checks and encodes), or image files (a ``[batch, channels, height, width]`` tensor). ``config`` is
    the entry's ``config.json``.

    Example:
        >>> config = {"hparams": {"backbone": {"class_path": "lightning_mtl.backbones.HFEncoder"}}}
        >>> read_inputs(config, ["great film", "dull plot"])
        (['great film', 'dull plot'], ['great film', 'dull plot'])
    """
    who = f"model {model!r}" if model else "this model"
    backbone = (config.get("hparams") or {}).get("backbone") or {}
    try:
        cls = resolve_class(backbone.get("class_path"), nn.Module, f"{who}'s backbone")
    except (ImportError, ValueError):
        cls = None
    # What the backbone's `preprocess` reads: "text" unless the class says otherwise (e.g. "table").
    input_kind = getattr(cls, "input_kind", "text" if hasattr(cls, "preprocess") else None)
    takes_text = input_kind == "text"
    suffixes = [Path(i).suffix.lower() for i in inputs]
    files = ".csv" in suffixes or any(s in IMAGE_SUFFIXES for s in suffixes)
    if files and takes_text:
        raise InputError(f"{who} takes text; pass the texts themselves as INPUT arguments, not {inputs}.")
    if ".csv" in suffixes:
        if len(inputs) != 1:
            raise InputError(f"a CSV file must be the only INPUT; got {len(inputs)} inputs: {inputs}.")
        if input_kind == "table":
            frame = _load_csv(Path(inputs[0]))
            return [f"row {i + 1}" for i in range(len(frame))], frame
        return _read_csv(Path(inputs[0]), config)
    if files:
        if not all(s in IMAGE_SUFFIXES for s in suffixes):
            raise InputError(
                f"give either image files ({', '.join(IMAGE_SUFFIXES)}) or texts, not both: {inputs}."
            )
        return inputs, _read_images([Path(i) for i in inputs], config)
    if not takes_text:
        width = _in_features(config)
        raise InputError(
            f"{who} does not take text (its backbone {backbone.get('class_path')} has no `preprocess`). "
            f"Pass one CSV file{f' with its {width} numeric input features' if width else ''}, or image files."
        )
    return inputs, inputs


def _setting(config: dict[str, Any], key: str) -> Any:
    """A preprocessing setting: ``config["preprocessing"][key]``, else ``config["extra"][key]``."""
    value = (config.get("preprocessing") or {}).get(key)
    return value if value is not None else (config.get("extra") or {}).get(key)


def _in_features(config: dict[str, Any]) -> int | None:
    init_args = ((config.get("hparams") or {}).get("backbone") or {}).get("init_args") or {}
    value = init_args.get("in_features")
    return value if isinstance(value, int) else None


def _load_csv(path: Path) -> Any:
    """A CSV file as a DataFrame with at least one data row (empty cells are NaN)."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    try:
        frame = pd.read_csv(path, float_precision="round_trip")  # exact decimal -> float parsing
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot be read as CSV ({err}).") from None
    if frame.empty:
        raise InputError(f"{path}: has no data rows.")
    return frame


def _read_csv(path: Path, config: dict[str, Any]) -> tuple[list[str], Any]:
    """The model's numeric input features from a CSV file, one example per row."""
    import numpy as np
    import pandas as pd
    import torch

    frame = _load_csv(path)
    names = _setting(config, "feature_names")
    numeric = [
        str(c)
        for c in frame.columns
        if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
    ]
    width = _in_features(config)
    if names:
        columns = [str(n) for n in names]
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise InputError(
                f"{path}: lacks the model's feature column(s) {missing}; it has {list(map(str, frame.columns))}."
            )
        text = [c for c in columns if c not in numeric]
        if text:
            raise InputError(f"{path}: feature column(s) {text} are not numeric.")
    else:
        columns = numeric
        if width is not None and len(columns) != width:
            raise InputError(
                f"{path}: has {len(columns)} numeric column(s) {columns}, but the model takes {width} input "
                "features. Keep only the feature columns, in training order (config.json records no "
                "preprocessing.feature_names to pick them by name)."
            )
        if not columns:
            raise InputError(f"{path}: has no numeric columns; the model takes numeric input features.")
    values = np.ascontiguousarray(frame[columns].to_numpy(dtype="float32"))  # row-major, as in training
    bad = ~torch.isfinite(torch.from_numpy(values))
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"{path}: data row {row + 1}, column {columns[col]!r} is empty or not finite; fill in every feature."
        )
    return [f"row {i + 1}" for i in range(len(frame))], torch.from_numpy(values)


def _read_images(paths: list[Path], config: dict[str, Any]) -> Any:
    """Images as a ``[batch, channels, height, width]`` float tensor in ``[0, 1]``, optionally resized
    and normalised (``preprocessing`` keys ``image_mode``, ``image_size``, ``mean``, ``std``)."""
    import numpy as np
    import torch

    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such file.")
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            "reading images needs Pillow, which is not installed: `pip install pillow`, then run again."
        ) from None
    mode = _setting(config, "image_mode") or "RGB"
    size = _setting(config, "image_size")
    if isinstance(size, int):
        size = [size, size]
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if size:
                    image = image.resize((int(size[1]), int(size[0])))
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot be read as an image ({err}).") from None
        arrays.append((array[:, :, None] if array.ndim == 2 else array).transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(
            f"the images have different sizes {sorted(s[1:] for s in shapes)}; resize them to one size "
            "(or record preprocessing.image_size in the model's config.json)."
        )
    batch = torch.from_numpy(np.stack(arrays))
    mean, std = _setting(config, "mean"), _setting(config, "std")
    if mean is not None and std is not None:
        batch = (batch - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return batch
