"""Release artifacts: a folder with ``config.json``, ``model.safetensors`` and a ``README.md`` model card.

``save_pretrained`` writes one atomically, ``from_pretrained`` loads one (from a folder or a Hugging Face
Hub id) strictly and without unpickling anything, ``export_checkpoint`` turns a Lightning ``.ckpt`` into
one (DESIGN.md section 5).

``config.json`` (schema version :data:`SCHEMA_VERSION`) holds everything needed to rebuild the module
without downloading pretrained weights: ``schema_version``, ``library`` (name, version), ``module_class``,
``hparams`` (the module's hyper-parameters: backbone spec with the architecture config, tasks, balancer,
...), ``preprocessing`` (tokenizer reference, ``max_length``, input keys), ``metrics`` per task, ``card``
(license, datasets, training data, recipe, intended use, limitations, ...), ``weights`` (file, SHA-256,
tensor names, dtype, size), ``base`` (``null``, or for ``trainable_only`` artifacts the reference and
fingerprint of the pretrained weights that are not stored) and ``extra``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import Self

from lightning_mtl._registry import import_object

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule

SCHEMA_VERSION = 1
"""The ``config.json`` schema this version writes; loading refuses newer ones."""

LIBRARY_NAME = "lightning-mtl"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CARD_FIELDS = (
    "name",
    "description",
    "license",
    "datasets",
    "training_data",
    "recipe",
    "intended_use",
    "limitations",
    "tags",
    "language",
)
_LIST_CARD_FIELDS = ("datasets", "tags", "language")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

PathLike = str | os.PathLike[str]


class ArtifactError(ValueError):
    """A release artifact (or a file in it) cannot be written or loaded; names the file and the problem."""

    def __init__(self, file: PathLike, problem: str) -> None:
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


# --- saving ---------------------------------------------------------------------------------------
def save_pretrained(
    module: MultiTaskModule,
    directory: PathLike,
    *,
    metrics: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    trainable_only: bool = False,
    base: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``module`` as a release artifact folder and return its path.

    Args:
        module: the module; its backbone must be stored as a spec (e.g. ``HFEncoder``, ``MLPBackbone``).
        directory: the folder to write. It is written atomically: everything goes to a temporary
            sibling folder that is renamed over ``directory`` at the end, so an interrupted save leaves
            the previous artifact (or nothing). An existing folder is replaced as a whole; one that is
            neither empty nor an artifact is refused.
        metrics: ``{task: {metric: value}}``, or flat Lightning results such as
            ``trainer.validate(...)[0]`` (``"val/<task>/<metric>"`` keys).
        card: model-card fields: ``license``, ``datasets``, ``training_data``, ``recipe``,
            ``intended_use``, ``limitations``, ``tags``, ``language``, ``name``, ``description``.
        trainable_only: store only the trainable backbone parameters (plus heads, balancer, losses
            and backbone buffers); the frozen rest is reloaded from ``base`` and verified by fingerprint.
        base: reference of the pretrained backbone (``pkg:`` ref, folder or hub id) for
            ``trainable_only``; default: the backbone's ``source``.
        extra: more JSON-able fields stored under ``extra`` in ``config.json``.

    Example:
        >>> import tempfile
        >>> from lightning_mtl import MultiTaskModule, Task
        >>> from lightning_mtl.backbones import MLPBackbone
        >>> module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("risk", kind="binary", labels=["low", "high"])])
        >>> path = save_pretrained(module, Path(tempfile.mkdtemp()) / "risk-model", metrics={"risk": {"auroc": 0.91}})
        >>> sorted(p.name for p in path.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
        >>> x = torch.randn(3, 4)
        >>> from_pretrained(path).predict(x) == module.predict(x)
        True
    """
    from safetensors.torch import save_file

    import lightning_mtl

    if base is not None and not trainable_only:
        raise ValueError(
            "base= names where the frozen weights come from; it is only used with trainable_only=True."
        )
    target = Path(directory)
    hparams = _json_hparams(module, target / CONFIG_NAME)
    tasks = [t["name"] for t in hparams["tasks"]]
    state = _contiguous_state(module)
    stored, base_info = (state, None)
    if trainable_only:
        stored, base_info = _split_trainable(module, state, base)
    spec = hparams["backbone"]
    init_args = dict(spec.get("init_args") or {})
    preprocessing = {
        "tokenizer": init_args.get("tokenizer"),
        "max_length": init_args.get("max_length"),
        "input_keys": list(hparams.get("input_keys") or getattr(module.backbone, "input_keys", None) or []),
    }
    for what, ref in (("tokenizer", preprocessing["tokenizer"]), ("base", base_info and base_info["ref"])):
        if isinstance(ref, str) and not ref.startswith("pkg:") and Path(ref).exists():
            rank_zero_warn(
                f"save_pretrained: the {what} reference {ref!r} is a local path; the artifact will only "
                "load where that path exists. Prefer a hub id or a `pkg:` reference for releases."
            )
    config: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "library": {"name": LIBRARY_NAME, "version": lightning_mtl.__version__},
        "module_class": _importable_class(module),
        "hparams": hparams,
        "preprocessing": preprocessing,
        "metrics": _clean_metrics(metrics, tasks),
        "card": _clean_card(card),
        "weights": {},
        "base": base_info,
        "extra": _json_able(dict(extra or {}), "extra"),
    }
    with _atomic_directory(target) as tmp:
        weights_path = tmp / WEIGHTS_NAME
        save_file(stored, str(weights_path), metadata={"format": "pt", "library": LIBRARY_NAME})
        _fsync_file(weights_path)
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in stored.values()})
        config["weights"] = {
            "file": WEIGHTS_NAME,
            "sha256": _sha256_file(weights_path),
            "bytes": weights_path.stat().st_size,
            "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
            "tensors": sorted(stored),
        }
        _write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, allow_nan=False) + "\n")
        _write_text(tmp / CARD_NAME, _render_card(config, target.name))
    return target


def _importable_class(module: nn.Module) -> str:
    """Dotted path of the module's class, or of its nearest base that can be imported by that path
    (a class defined in a script run as ``__main__`` cannot be)."""
    for cls in type(module).__mro__:
        path = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            continue
        try:
            if import_object(path) is cls:
                return path
        except ImportError:
            continue
    return "lightning_mtl.module.MultiTaskModule"


def _json_hparams(module: nn.Module, config_path: Path) -> dict[str, Any]:
    hparams = dict(getattr(module, "hparams", {}) or {})
    if "tasks" not in hparams or "backbone" not in hparams:
        raise TypeError(f"save_pretrained expects a MultiTaskModule, got {type(module).__name__}.")
    if hparams["backbone"] is None:
        raise ArtifactError(
            config_path,
            f"the backbone ({hparams.get('backbone_class')}) has no `spec()`, so config.json could not rebuild it. "
            "Use a backbone with a spec (HFEncoder, MLPBackbone) or give yours a `spec()` method returning "
            "{'class_path': ..., 'init_args': ...}.",
        )
    hparams = _json_able(hparams, "hyper-parameter")
    _check_class_paths(hparams, config_path)
    return hparams


def _json_able(value: dict[str, Any], what: str) -> dict[str, Any]:
    for key, item in value.items():
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{what} {key!r} is not JSON-serialisable ({err}); config.json stores only JSON values. "
                "Pass a name, a number, a list/dict of those, or a {'class_path', 'init_args'} spec."
            ) from None
    return cast(dict[str, Any], json.loads(json.dumps(value)))


def _contiguous_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict on CPU, contiguous, with tensors that share memory cloned (safetensors refuses those)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _split_trainable(
    module: MultiTaskModule, state: dict[str, Tensor], base: str | None
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Tensors to store (everything except frozen backbone parameters) and the record of the rest."""
    params = dict(module.named_parameters(remove_duplicate=False))
    frozen = {n for n in state if n.startswith("backbone.") and n in params and not params[n].requires_grad}
    if not frozen:
        rank_zero_warn(
            "save_pretrained(trainable_only=True): every backbone parameter is trainable, so nothing would "
            "come from the base model; saving the full model instead."
        )
        return state, None
    spec = module.hparams["backbone"]
    if not hasattr(import_object(spec["class_path"]), "from_pretrained"):
        raise TypeError(
            f"trainable_only=True needs a backbone that reloads its frozen weights with `from_pretrained` "
            f"(e.g. HFEncoder); {spec['class_path']} has none. Save the full model instead."
        )
    ref = base if base is not None else getattr(module.backbone, "source", None)
    if not ref:
        raise ValueError(
            "trainable_only=True needs the reference of the pretrained backbone: pass base=<pkg: ref, folder "
            "or hub id> (the backbone has no `source`, e.g. it was built from a config)."
        )
    base_state = {n: state[n] for n in sorted(frozen)}
    fingerprint, tensors = _fingerprint(base_state)
    stored = {n: t for n, t in state.items() if n not in frozen}
    return stored, {"ref": str(ref), "fingerprint": fingerprint, "tensors": tensors}


def _fingerprint(tensors: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """SHA-256 over the sorted names, dtypes, shapes and bytes; plus each tensor's shape, dtype and digest."""
    total = hashlib.sha256()
    each: dict[str, Any] = {}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = list(t.shape)
        data = t.reshape(-1).view(torch.uint8).numpy().data
        total.update(f"{name}\0{dtype}\0{shape}\0".encode())
        total.update(data)
        each[name] = {"shape": shape, "dtype": dtype, "sha256": hashlib.sha256(data).hexdigest()}
    return total.hexdigest(), each


def _clean_metrics(metrics: Mapping[str, Any] | None, tasks: list[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, Mapping):
            task, items = str(key), [(str(k), v) for k, v in value.items()]
        else:
            parts = str(key).split("/")
            if len(parts) == 3:
                task, items = parts[1], [(f"{parts[0]}/{parts[2]}", value)]
            elif len(parts) == 2:
                task, items = parts[0], [(parts[1], value)]
            else:
                raise ValueError(
                    f"metrics: cannot tell the task of {key!r}; pass {{task: {{metric: value}}}} or "
                    "'<stage>/<task>/<metric>' keys as Lightning logs them."
                )
        if task not in tasks:
            raise ValueError(f"metrics given for unknown task {task!r} (key {key!r}); the tasks are {tasks}.")
        for name, v in items:
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metrics[{task!r}][{name!r}] must be a number, got {v!r}.") from None
            out.setdefault(task, {})[name] = number if math.isfinite(number) else None
    return out


def _clean_card(card: Mapping[str, Any] | None) -> dict[str, Any]:
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_FIELDS))
    if unknown:
        raise ValueError(f"card: unknown field(s) {unknown}; known fields: {list(CARD_FIELDS)}.")
    out: dict[str, Any] = {}
    for key in CARD_FIELDS:
        value = card.get(key)
        if key in _LIST_CARD_FIELDS:
            value = [value] if isinstance(value, str) else [str(v) for v in value or []]
        elif key == "recipe" and isinstance(value, Mapping):
            value = _json_able(dict(value), "card recipe field")
        elif value is not None:
            value = str(value)
        out[key] = value
    return out


def _render_card(config: dict[str, Any], default_name: str) -> str:
    """The README.md model card: YAML front matter, tasks, metrics, intended use, limitations, training."""
    card = config["card"]
    base = config["base"]
    tags = ["lightning-mtl", "multi-task", "pytorch-lightning"]
    tags += [t for t in card["tags"] if t not in tags]
    front = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        f"license: {_yaml(card['license'] or 'unknown')}",
        "tags:",
        *[f"- {_yaml(t)}" for t in tags],
    ]
    if card["datasets"]:
        front += ["datasets:", *[f"- {_yaml(d)}" for d in card["datasets"]]]
    if card["language"]:
        front += ["language:", *[f"- {_yaml(lang)}" for lang in card["language"]]]
    ref = base["ref"] if base else None
    if ref and _HUB_ID.match(ref) and not Path(ref).exists():
        front.append(f"base_model: {_yaml(ref)}")
    front.append("---")

    hp = config["hparams"]
    name = card["name"] or default_name
    lines = [*front, "", f"# {name}", ""]
    if card["description"]:
        lines += [card["description"], ""]
    backbone = hp["backbone"]["class_path"].rsplit(".", 1)[-1]
    lines += [
        f"A multi-task model for [lightning-mtl](https://github.com/lightning-mtl/lightning-mtl): one "
        f"`{backbone}` backbone shared by {len(hp['tasks'])} task heads.",
        "",
        "## Tasks",
        "",
        "| task | kind | labels | head |",
        "|---|---|---|---|",
    ]
    for t in hp["tasks"]:
        labels = ", ".join(t["labels"]) if t.get("labels") else "-"
        lines.append(f"| {_cell(t['name'])} | {t['kind']} | {_cell(labels)} | {_cell(t['head'])} |")
    lines += ["", "## Metrics", ""]
    if config["metrics"]:
        lines += ["| task | metric | value |", "|---|---|---|"]
        for task, values in config["metrics"].items():
            for metric, value in values.items():
                shown = "n/a" if value is None else f"{value:.4g}"
                lines.append(f"| {_cell(task)} | {_cell(metric)} | {shown} |")
    else:
        lines.append("No metrics were recorded.")
    lines += ["", "## Intended use", "", card["intended_use"] or "Not documented.", ""]
    lines += ["## Limitations", "", card["limitations"] or "Not documented.", ""]
    lines += ["## Training", ""]
    if card["training_data"]:
        lines.append(f"- Data: {card['training_data']}")
    if card["datasets"]:
        lines.append(f"- Datasets: {', '.join(card['datasets'])}")
    recipe = card["recipe"]
    if isinstance(recipe, dict):
        lines += ["- Recipe:", "", "```json", json.dumps(recipe, indent=2), "```"]
    elif recipe:
        lines.append(f"- Recipe: {recipe}")
    if not (card["training_data"] or card["datasets"] or recipe):
        lines.append("Not documented.")
    weights = config["weights"]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from lightning_mtl import zoo",
        "",
        f"model = zoo.load({json.dumps(name)})  # a zoo name, this folder's path or its hub id",
        "predictions = model.predict(inputs)",
        "```",
        "",
        "## Files",
        "",
        f"- `{CONFIG_NAME}`: schema version {config['schema_version']}, written by {LIBRARY_NAME} "
        f"{config['library']['version']}.",
        f"- `{WEIGHTS_NAME}`: {len(weights['tensors'])} tensors ({weights['dtype']}), "
        f"SHA-256 `{weights['sha256']}`.",
    ]
    if base:
        lines.append(
            f"- Only the trained tensors are stored; the {len(base['tensors'])} frozen backbone tensors come "
            f"from `{base['ref']}` (fingerprint `{base['fingerprint'][:16]}`)."
        )
    return "\n".join(lines) + "\n"


def _yaml(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# --- atomic folder writes -------------------------------------------------------------------------
@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success fsync it and rename it over ``target``."""
    if target.exists() and not target.is_dir():
        raise ArtifactError(target, "exists and is not a directory; refusing to replace it.")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise ArtifactError(
            target,
            f"exists, is not empty and holds no {CONFIG_NAME}; refusing to replace a folder that is not a "
            "release artifact. Choose another directory or empty it.",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- loading --------------------------------------------------------------------------------------
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
    config = _read_config(config_path)
    if not weights_path.is_file():
        raise ArtifactError(
            weights_path, f"missing; an artifact folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    found_shapes = _read_header(weights_path)
    expected_sha = _require(config, config_path, "weights", "sha256")
    actual_sha = _sha256_file(weights_path)
    if actual_sha != expected_sha:
        raise ArtifactError(
            weights_path,
            f"SHA-256 mismatch: the file hashes to {actual_sha}, {CONFIG_NAME} records {expected_sha}. "
            "The file was modified or corrupted after saving; download or export it again.",
        )
    hparams = _require(config, config_path, "hparams")
    if not isinstance(hparams, dict):
        raise ArtifactError(config_path, f"'hparams' must be an object, got {type(hparams).__name__}.")
    _check_class_paths(hparams, config_path)
    if module_class is None:
        module_class = _recorded_module_class(config, config_path)
    base = config.get("base")
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

    from safetensors.torch import load_file

    tensors = {renamed[n]: t for n, t in load_file(str(weights_path), device="cpu").items()}
    tensors = {n: t for n, t in tensors.items() if n in want}
    module.load_state_dict(tensors, strict=False)  # the name sets were checked above
    return module.to(map_location).eval()


DEFAULT_MODULE_CLASS = "lightning_mtl.module.MultiTaskModule"


def _recorded_module_class(config: dict[str, Any], path: Path) -> type[MultiTaskModule]:
    """The module class recorded in ``config.json`` if it lies in ``lightning_mtl``, else the default one;
    imported by name (``hub`` never imports ``module``: no import cycle), and refused unless it is a
    :class:`HubMixin` ``nn.Module``."""
    recorded = config.get("module_class")
    name = recorded if isinstance(recorded, str) and recorded.startswith("lightning_mtl.") else None
    try:
        cls = import_object(name or DEFAULT_MODULE_CLASS)
    except ImportError:
        cls = import_object(DEFAULT_MODULE_CLASS)
    if not (inspect.isclass(cls) and issubclass(cls, HubMixin) and issubclass(cls, nn.Module)):
        raise ArtifactError(path, f"module_class {recorded!r} is not a lightning_mtl module class.")
    return cast("type[MultiTaskModule]", cls)


def _resolve(ref: PathLike) -> Path:
    path = Path(ref)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ArtifactError(
            path, f"is a file; pass the artifact folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    if path.is_dir():
        return path
    text = str(ref)
    if not _HUB_ID.match(text) or text.startswith("."):
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


def _read_config(path: Path) -> dict[str, Any]:
    import lightning_mtl

    if not path.is_file():
        raise ArtifactError(path, f"missing; this folder is not a {LIBRARY_NAME} release artifact.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(path, f"is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ArtifactError(path, f"must hold a JSON object, got {type(config).__name__}.")
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
    return config


def _require(config: dict[str, Any], path: Path, *keys: str) -> Any:
    value: Any = config
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(path, f"lacks '{'.'.join(keys[: i + 1])}'.")
        value = value[key]
    return value


def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise ArtifactError(
            path, f"is truncated or corrupt and cannot be parsed as safetensors ({err})."
        ) from None


def _check_class_paths(value: Any, path: Path) -> None:
    """Every ``class_path`` in the config must name an ``nn.Module`` class, so a crafted config.json
    cannot make the loader call arbitrary functions (e.g. ``subprocess.run``)."""
    if isinstance(value, Mapping):
        class_path = value.get("class_path")
        if isinstance(class_path, str):
            try:
                obj = import_object(class_path)
            except ImportError as err:
                raise ArtifactError(path, f"class_path {class_path!r} cannot be imported ({err}).") from None
            if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
                raise ArtifactError(
                    path,
                    f"class_path {class_path!r} is not an nn.Module class; artifacts may only build modules.",
                )
        for item in value.values():
            _check_class_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            _check_class_paths(item, path)


def _build(
    module_class: type[MultiTaskModule], hparams: dict[str, Any], base: Any, config_path: Path
) -> MultiTaskModule:
    params = inspect.signature(module_class.__init__).parameters
    unknown = sorted(set(hparams) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ArtifactError(
            config_path,
            f"hparams {unknown} are unknown to {module_class.__name__} of this version; the artifact needs a "
            "newer lightning-mtl (or the module class it was saved from).",
        )
    kwargs = dict(hparams)
    if base:
        if not isinstance(base, dict) or not {"ref", "fingerprint", "tensors"} <= set(base):
            raise ArtifactError(config_path, "'base' must hold 'ref', 'fingerprint' and 'tensors'.")
        spec = hparams.get("backbone") or {}
        init_args = {k: v for k, v in (spec.get("init_args") or {}).items() if k != "config"}
        try:
            cls = import_object(spec["class_path"])
            kwargs["backbone"] = cls.from_pretrained(base["ref"], **init_args)
        except Exception as err:
            raise ArtifactError(
                config_path,
                f"this artifact stores only the trained tensors; building its base model {base['ref']!r} "
                f"failed: {err}",
            ) from err
    try:
        return module_class(**kwargs)
    except Exception as err:
        raise ArtifactError(
            config_path,
            f"cannot rebuild {module_class.__name__} from its hparams: {type(err).__name__}: {err}",
        ) from err


def _check_tensors(
    path: Path,
    want: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    strict: bool,
    in_file: Mapping[str, str] | None = None,
) -> None:
    """``in_file``: today's name -> the name stored in the file, for tensors of an earlier layout (named as
    the file names them in the messages)."""
    named = in_file or {}
    missing = sorted(set(want) - set(found))
    extra = sorted(named.get(n, n) for n in set(found) - set(want))
    shapes = [
        f"{named.get(n, n)}: expected {want[n]}, found {found[n]}"
        for n in sorted(set(want) & set(found))
        if want[n] != found[n]
    ]
    if shapes:
        raise ArtifactError(
            path, "shape mismatch with the module rebuilt from config.json: " + "; ".join(shapes)
        )
    if missing or extra:
        problem = "does not hold exactly the tensors of the module rebuilt from config.json: " + "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
            )
            if part
        )
        if strict:
            raise ArtifactError(
                path,
                problem + ". Pass strict=False to load anyway (missing tensors stay randomly initialised).",
            )
        rank_zero_warn(
            f"{path}: {problem} (strict=False: missing tensors keep their random initialisation, unexpected ones are ignored)."
        )


def _check_base(path: Path, base: dict[str, Any], state: Mapping[str, Tensor], strict: bool) -> None:
    recorded: dict[str, Any] = base["tensors"]
    missing = sorted(n for n in recorded if n not in state)
    shapes = [
        f"{n}: expected {tuple(r['shape'])}, found {tuple(state[n].shape)}"
        for n, r in sorted(recorded.items())
        if n in state and list(state[n].shape) != list(r["shape"])
    ]
    if missing or shapes:
        raise ArtifactError(
            path,
            f"the base model {base['ref']!r} does not have the architecture this artifact was trained on: "
            + "; ".join(p for p in (f"missing tensors {missing}" if missing else "", "; ".join(shapes)) if p),
        )
    fingerprint, tensors = _fingerprint({n: state[n] for n in recorded})
    if fingerprint == base["fingerprint"]:
        return
    changed = sorted(
        n
        for n, r in recorded.items()
        if tensors[n]["sha256"] != r.get("sha256") or tensors[n]["dtype"] != r.get("dtype")
    )
    problem = (
        f"the base model {base['ref']!r} does not match the one this artifact was trained on: fingerprint "
        f"{fingerprint} != recorded {base['fingerprint']}; {len(changed)} of {len(recorded)} base tensors differ: "
        f"{changed[:10]}{' ...' if len(changed) > 10 else ''}"
    )
    if strict:
        raise ArtifactError(path, problem + ". Use the original base, or pass strict=False to load anyway.")
    rank_zero_warn(f"{path}: {problem} (strict=False: loading anyway).")


# --- Lightning checkpoints -------------------------------------------------------------------------
def export_checkpoint(
    ckpt_path: PathLike,
    directory: PathLike,
    *,
    module_class: type[MultiTaskModule] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Turn a Lightning ``.ckpt`` of a :class:`~lightning_mtl.MultiTaskModule` into a release artifact.

    Only the weights and hyper-parameters are kept; optimizer, scheduler, loop and callback states are
    dropped. The checkpoint is read with ``torch.load(weights_only=True)`` (PyTorch's restricted
    unpickler: tensors and plain containers only). This is the *local, trusted-checkpoint* path:
    convert your own checkpoints here, and share the resulting folder, which loads without pickle.
    ``module_class``: the class to rebuild (default ``MultiTaskModule``). ``save_kwargs`` go to
    :func:`save_pretrained`; the checkpoint's epoch and global step are recorded under ``extra["checkpoint"]``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ArtifactError(path, "no such checkpoint file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ArtifactError(path, f"cannot be read with torch.load(weights_only=True): {err}") from err
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        raise ArtifactError(
            path,
            "is not a Lightning checkpoint of a MultiTaskModule (it lacks 'state_dict' or 'hyper_parameters').",
        )
    provenance = {k: ckpt[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in ckpt}
    del ckpt
    cls = module_class or import_object(DEFAULT_MODULE_CLASS)
    module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    extra = dict(save_kwargs.pop("extra", None) or {})
    extra.setdefault("checkpoint", {"file": path.name, **provenance})
    return save_pretrained(module, directory, extra=extra, **save_kwargs)


# --- mixin ----------------------------------------------------------------------------------------
class HubMixin:
    """Adds :meth:`save_pretrained` and :meth:`from_pretrained` (release artifacts) to ``MultiTaskModule``."""

    def save_pretrained(self, directory: PathLike, **kwargs: Any) -> Path:
        """Write a release artifact folder; see :func:`lightning_mtl.hub.save_pretrained`."""
        return save_pretrained(cast("MultiTaskModule", self), directory, **kwargs)

    @classmethod
    def from_pretrained(cls, ref: PathLike, **kwargs: Any) -> Self:
        """Load a release artifact folder or hub id; see :func:`lightning_mtl.hub.from_pretrained`."""
        return cast(Self, from_pretrained(ref, module_class=cast(Any, cls), **kwargs))


__all__ = [
    "SCHEMA_VERSION",
    "ArtifactError",
    "HubMixin",
    "export_checkpoint",
    "from_pretrained",
    "save_pretrained",
]
