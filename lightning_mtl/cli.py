"""The ``lightning-mtl`` command: browse the model zoo, predict with a model, export a checkpoint.

    lightning-mtl zoo list [--filter PATTERN] [--json]
    lightning-mtl zoo describe NAME [--json]
    lightning-mtl predict NAME INPUT... [--json]      # texts, one CSV file, or image files
    lightning-mtl export CKPT DIR [--card KEY=VALUE ...]

``NAME`` is a zoo entry, an artifact folder or a Hugging Face Hub id. Errors print one line to stderr
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_mtl import hub, zoo
from lightning_mtl.zoo.inputs import read_inputs


class CLIError(Exception):
    """A problem with what the user gave on the command line; printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 usage or input error).

    Example:
        >>> main(["zoo", "list", "--filter", "no-such-model-*", "--json"])
        []
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed by argparse)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    try:
        return int(args.run(args))
    except (CLIError, LookupError, ValueError, TypeError, OSError, ImportError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"lightning-mtl: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-mtl", description="Multi-task models: browse the zoo, predict, export checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    zoo_parser = commands.add_parser("zoo", help="list and describe zoo models")
    zoo_commands = zoo_parser.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    listing = zoo_commands.add_parser("list", help="list the zoo's models")
    listing.add_argument(
        "--filter", metavar="PATTERN", help="only names matching this pattern, e.g. '*text*'"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_zoo_list)
    describe = zoo_commands.add_parser("describe", help="show one model's card, tasks and metrics")
    describe.add_argument("name", metavar="NAME", help="a zoo name, an artifact folder or a hub id")
    describe.add_argument("--json", action="store_true", help="print JSON")
    describe.set_defaults(run=_zoo_describe)

    predict = commands.add_parser("predict", help="predict every task of a model for some inputs")
    predict.add_argument("name", metavar="NAME", help="a zoo name, an artifact folder or a hub id")
    predict.add_argument(
        "inputs", metavar="INPUT", nargs="+", help="texts, one CSV file (tabular models) or image files"
    )
    predict.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="turn a Lightning .ckpt into a release artifact folder")
    export.add_argument("ckpt", metavar="CKPT", type=Path, help="the Lightning checkpoint")
    export.add_argument("directory", metavar="DIR", type=Path, help="the artifact folder to write")
    export.add_argument(
        "--card",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help=f"a model-card field ({', '.join(hub.CARD_FIELDS)}); repeatable",
    )
    export.set_defaults(run=_export)
    return parser


# --- zoo ----------------------------------------------------------------------------------------------
def _zoo_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in zoo.list_models(args.filter):
        entry = zoo.get_entry(name)
        if entry.remote:  # never download just to list
            rows.append(
                {"name": name, "source": entry.source, "ref": entry.ref, "description": entry.description}
            )
            continue
        try:
            rows.append(zoo.describe(entry))
        except ValueError as err:  # one broken entry does not hide the others
            rows.append({"name": name, "source": entry.source, "ref": entry.ref, "error": str(err)})
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        where = ", ".join(str(d) for d in zoo.zoo_dirs()) or "none"
        print(f"No models{' match ' + repr(args.filter) if args.filter else ''} (zoo folders: {where}).")
        return 0
    table = [["name", "tasks", "size", "weights", "license", "description"]]
    for row in rows:
        if "error" in row:
            table.append([row["name"], "-", "-", "-", "-", f"invalid: {row['error']}"])
            continue
        tasks = ", ".join(f"{t['name']} ({t['kind']})" for t in row.get("tasks", []))
        table.append(
            [
                row["name"],
                tasks or "-",
                _size(row.get("size_bytes")),
                _weights_state(row),
                row.get("license") or "-",
                _shorten(row.get("description") or "", 60),
            ]
        )
    print(_table(table))
    return 0


def _zoo_describe(args: argparse.Namespace) -> int:
    info = zoo.describe(args.name)
    if args.json:
        _print_json(info)
        return 0
    params = f"{info['parameters']:,} parameters" if info["parameters"] is not None else "parameters unknown"
    fields = [
        ("name", info["name"]),
        ("description", info["description"]),
        ("source", f"{info['source']}: {info['path'] or info['ref']}"),
        ("weights", f"{_weights_state(info)}, {_size(info['size_bytes'])}, {params}, {info['dtype']}"),
        ("license", info["license"]),
        ("datasets", ", ".join(info["datasets"])),
        ("training data", info["training_data"]),
        ("recipe", json.dumps(info["recipe"]) if isinstance(info["recipe"], dict) else info["recipe"]),
        ("base model", info["base"]),
        ("intended use", info["intended_use"]),
        ("limitations", info["limitations"]),
    ]
    width = max(len(k) for k, _ in fields) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in fields if v]
    lines += ["", "tasks:"]
    tasks = [[t["name"], t["kind"], ", ".join(t["labels"]) if t["labels"] else "-"] for t in info["tasks"]]
    lines += ["  " + line for line in _table(tasks, header=False).splitlines()]
    lines += ["", "metrics:"]
    metrics = [
        [task, metric, "n/a" if value is None else f"{value:.4g}"]
        for task, values in info["metrics"].items()
        for metric, value in values.items()
    ]
    lines += (
        ["  " + line for line in _table(metrics, header=False).splitlines()]
        if metrics
        else ["  none recorded"]
    )
    print("\n".join(lines))
    return 0


def _weights_state(info: dict[str, Any]) -> str:
    present = info.get("weights_present")
    if present is None:
        return "remote"
    if present:
        return "present"
    return "from recipe" if info.get("recipe") else "missing"


# --- predict ------------------------------------------------------------------------------------------
def _predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}.")
    entry = zoo.get_entry(args.name)
    config = entry.config()
    shown, inputs = read_inputs(config, list(args.inputs), model=entry.name)
    module = zoo.load(entry)
    try:
        predictions = module.predict(inputs, batch_size=args.batch_size)
    except RuntimeError as err:  # e.g. a shape mismatch: inputs of the wrong size for this model
        raise CLIError(
            f"model {entry.name!r} cannot run on these inputs: {str(err).splitlines()[0]}"
        ) from err
    if args.json:
        _print_json({"model": entry.name, "inputs": shown, "predictions": predictions})
        return 0
    tasks = list(predictions)
    table = [["input", *tasks]]
    for i, label in enumerate(shown):
        table.append([_shorten(label, 48), *(_format_prediction(predictions[t][i]) for t in tasks)])
    print(_table(table))
    return 0


def _format_prediction(pred: dict[str, Any]) -> str:
    if "label" in pred:  # `probability` is that of the label shown
        probability = pred.get("probability")
        return f"{pred['label']} ({probability:.3f})" if probability is not None else str(pred["label"])
    if "value" in pred:
        return f"{pred['value']:.4g}"
    if "values" in pred:
        return ", ".join(f"{k}={v:.4g}" for k, v in pred["values"].items())
    if "labels" in pred:
        return " ".join(map(str, pred["labels"])) or "-"
    if "mask" in pred:
        mask = pred["mask"]
        return f"mask {len(mask)}x{len(mask[0]) if mask else 0}"
    return json.dumps(pred)


# --- export -------------------------------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    card: dict[str, str] = {}
    for item in args.card:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--card takes KEY=VALUE, got {item!r}.")
        card[key.strip()] = value
    path = hub.export_checkpoint(args.ckpt, args.directory, card=card)
    weights = json.loads((path / hub.CONFIG_NAME).read_text(encoding="utf-8"))["weights"]
    print(
        f"Wrote {path}: {len(weights['tensors'])} tensors, {_size(weights['bytes'])}, "
        f"sha256 {weights['sha256'][:12]}. Load it with lightning_mtl.zoo.load({str(path)!r})."
    )
    return 0


# --- output helpers -----------------------------------------------------------------------------------
def _table(rows: Sequence[Sequence[str]], header: bool = True) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header row."""
    if not rows:
        return ""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths)).rstrip()

    lines = [line(row) for row in rows]
    if header:
        lines.insert(1, line(["-" * w for w in widths]))
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    if n < 1000:
        return f"{n} B"
    units = ["KB", "MB", "GB", "TB"]
    value = n / 1000
    while round(value, 1) >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
