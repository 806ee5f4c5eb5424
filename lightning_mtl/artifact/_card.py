"""The ``README.md`` model card: the card fields a user gives, and the card rendered from ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_mtl.artifact._layout import CONFIG_NAME, HUB_ID, LIBRARY_NAME, WEIGHTS_NAME
from lightning_mtl.artifact.config import _json_able

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
    if ref and HUB_ID.match(ref) and not Path(ref).exists():
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
