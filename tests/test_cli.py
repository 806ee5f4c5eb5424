"""The ``lightning-mtl`` command line: zoo list/describe, predict on texts, CSV files and images,
checkpoint export, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TABULAR_TASKS, TINY_BERT, DictDataset, fit, isolate_zoo, toy_tabular
from torch.utils.data import DataLoader
from transformers import BertConfig

from lightning_mtl import MultiTaskModule, Task, cli, zoo
from lightning_mtl.backbones import PACKAGED_MINILM, HFEncoder, MLPBackbone
from lightning_mtl.hub import from_pretrained, save_pretrained

TEXTS = ["a calm and pleasant story", "the match ended in a draw", "markets fell sharply today"]
TEXT_TASKS = [
    Task("sentiment", kind="binary", labels=["neg", "pos"]),
    Task("topic", kind="multiclass", labels=["business", "sport", "world"]),
]
CARD = {"license": "apache-2.0", "datasets": ["toy/tabular"], "recipe": "python recipes/clinical.py"}
FEATURES = [f"x{i}" for i in range(8)]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("cli-zoo")
    torch.manual_seed(0)
    tab = MultiTaskModule(MLPBackbone(8, hidden=(32,), dropout=0.0), TABULAR_TASKS).eval()
    save_pretrained(
        tab,
        root / "clinical-mlp",
        metrics={"risk": {"auroc": 0.875}, "stay": {"mae": 1.25}},
        card={**CARD, "description": "Four clinical tasks from eight features."},
    )
    encoder = HFEncoder.from_config(BertConfig(**TINY_BERT), tokenizer=PACKAGED_MINILM, max_length=32)
    text = MultiTaskModule(encoder, TEXT_TASKS).eval()
    save_pretrained(text, root / "tiny-text", metrics={"topic": {"accuracy": 0.5}}, card=CARD)
    save_pretrained(tab, root / "recipe-only", card=CARD)
    (root / "recipe-only" / "model.safetensors").unlink()
    return SimpleNamespace(root=root, tab=tab, text=text)


@pytest.fixture
def env(built, monkeypatch) -> SimpleNamespace:
    isolate_zoo(monkeypatch, built.root)
    return built


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_error(capsys, argv, *fragments: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("lightning-mtl: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def write_csv(path: Path, x: torch.Tensor, columns: list[str], extra: dict[str, list] | None = None) -> Path:
    """Floats written with repr, so the float32 values read back exactly."""
    extra = extra or {}
    lines = [",".join([*extra, *columns])]
    for i, row in enumerate(x.tolist()):
        lines.append(",".join([*(str(v[i]) for v in extra.values()), *(repr(v) for v in row)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def columns_of(line: str) -> list[int]:
    """Start offsets of the cells of a table row (cells are separated by two or more spaces)."""
    starts, i = [0], 0
    while (i := line.find("  ", i)) != -1:
        j = i
        while j < len(line) and line[j] == " ":
            j += 1
        if j < len(line):
            starts.append(j)
        i = j
    return starts


# --- zoo list / describe --------------------------------------------------------------------------------
def test_zoo_list_prints_an_aligned_table(env, capsys):
    code, out, err = run(capsys, "zoo", "list")
    assert code == 0 and err == ""
    header, rule, *rows = out.splitlines()
    assert header.split() == ["name", "tasks", "size", "weights", "license", "description"]
    assert [r.split()[0] for r in rows] == ["clinical-mlp", "recipe-only", "tiny-text"]
    clinical = rows[0]
    assert "risk (binary), group (multiclass), flags (multilabel), stay (regression)" in clinical
    assert "present" in clinical and "apache-2.0" in clinical and "Four clinical tasks" in clinical
    assert "from recipe" in rows[1]
    assert columns_of(rule) == columns_of(header) == columns_of(rows[0])[: len(columns_of(header))]


def test_zoo_list_filter_and_json(env, capsys):
    listed = run_json(capsys, "zoo", "list", "--filter", "*text*")
    assert [row["name"] for row in listed] == ["tiny-text"]
    assert listed[0] == zoo.describe("tiny-text")
    code, out, _ = run(capsys, "zoo", "list", "--filter", "nothing-*")
    assert code == 0 and "No models match 'nothing-*'" in out


def test_zoo_list_shows_a_broken_entry_without_hiding_the_others(env, capsys, tmp_path, monkeypatch):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{oops")
    monkeypatch.setenv(zoo.ENV_VAR, f"{env.root}{os.pathsep}{tmp_path}")
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0
    broken = next(line for line in out.splitlines() if line.startswith("broken"))
    assert "invalid:" in broken and "not valid JSON" in broken
    assert "clinical-mlp" in out


def test_zoo_describe_text_and_json(env, capsys):
    assert run_json(capsys, "zoo", "describe", "clinical-mlp") == zoo.describe("clinical-mlp")
    code, out, _ = run(capsys, "zoo", "describe", "clinical-mlp")
    assert code == 0
    params = sum(t.numel() for t in env.tab.state_dict().values())
    assert "name:          clinical-mlp" in out
    assert f"present, {(env.root / 'clinical-mlp' / 'model.safetensors').stat().st_size / 1000:.1f} KB" in out
    assert f"{params:,} parameters" in out
    assert "license:       apache-2.0" in out
    assert "group  multiclass  a, b, c" in out
    assert "risk  auroc  0.875" in out


# --- predict --------------------------------------------------------------------------------------------
def test_predict_text_json_matches_module_predict(env, capsys):
    result = run_json(capsys, "predict", "tiny-text", *TEXTS)
    assert result["model"] == "tiny-text"
    assert result["inputs"] == TEXTS
    assert result["predictions"] == env.text.predict(TEXTS)


def test_predict_text_table_shows_each_label_with_its_probability(env, capsys):
    code, out, _ = run(capsys, "predict", "tiny-text", *TEXTS[:2])
    assert code == 0
    header, _, *rows = out.splitlines()
    assert header.split() == ["input", "sentiment", "topic"]
    assert len(rows) == 2
    expected = env.text.predict(TEXTS[:2])
    for text, row, sentiment, topic in zip(TEXTS, rows, expected["sentiment"], expected["topic"]):
        label = sentiment["label"]
        assert row.startswith(text)
        assert f"{label} ({sentiment['probabilities'][label]:.3f})" in row
        assert f"{topic['label']} ({topic['probability']:.3f})" in row


def test_predict_csv_json_matches_module_predict(env, capsys, tmp_path):
    x = toy_tabular(5, seed=3)["x"]
    path = write_csv(tmp_path / "rows.csv", x, FEATURES)
    result = run_json(capsys, "predict", "clinical-mlp", path)
    assert result["inputs"] == [f"row {i}" for i in range(1, 6)]
    assert result["predictions"] == env.tab.predict(x)
    code, out, _ = run(capsys, "predict", "clinical-mlp", path)
    assert code == 0 and f"{env.tab.predict(x)['stay'][0]['value']:.4g}" in out.splitlines()[2]


def test_predict_csv_picks_feature_columns_by_name_from_config(env, capsys, tmp_path):
    folder = tmp_path / "named"
    save_pretrained(env.tab, folder, card=CARD)
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"]["feature_names"] = FEATURES
    (folder / "config.json").write_text(json.dumps(config))
    x = toy_tabular(4, seed=4)["x"]
    order = [3, 1, 0, 2, 7, 6, 5, 4]  # shuffled columns plus an id and a text column
    path = write_csv(
        tmp_path / "rows.csv",
        x[:, order],
        [FEATURES[i] for i in order],
        extra={"id": [10, 11, 12, 13], "ward": ["a", "b", "c", "d"]},
    )
    result = run_json(capsys, "predict", folder, path)
    assert result["predictions"] == env.tab.predict(x)
    # save_pretrained(extra=...) is the other place the names may live
    save_pretrained(env.tab, tmp_path / "via-extra", card=CARD, extra={"feature_names": FEATURES})
    assert run_json(capsys, "predict", tmp_path / "via-extra", path)["predictions"] == env.tab.predict(x)


def test_predict_csv_with_the_wrong_columns_is_refused(env, capsys, tmp_path):
    x = toy_tabular(3, seed=3)["x"]
    path = write_csv(tmp_path / "rows.csv", x, FEATURES, extra={"id": [1, 2, 3]})
    assert_error(
        capsys, ["predict", "clinical-mlp", path], "has 9 numeric column(s)", "takes 8 input features"
    )
    write_csv(tmp_path / "rows.csv", x, FEATURES)
    text = (tmp_path / "rows.csv").read_text().splitlines()
    text[2] = ",".join(["", *text[2].split(",")[1:]])  # an empty cell in data row 2
    (tmp_path / "rows.csv").write_text("\n".join(text) + "\n")
    assert_error(capsys, ["predict", "clinical-mlp", tmp_path / "rows.csv"], "data row 2, column 'x0'")


def test_inputs_the_model_cannot_run_on_are_one_line_errors(env, capsys, tmp_path):
    folder = tmp_path / "seven"
    save_pretrained(env.tab, folder, card=CARD)
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"]["feature_names"] = FEATURES[:7]  # inconsistent with the 8-wide backbone
    (folder / "config.json").write_text(json.dumps(config))
    path = write_csv(tmp_path / "rows.csv", toy_tabular(2)["x"], FEATURES)
    assert_error(capsys, ["predict", folder, path], "cannot run on these inputs", "7")
    assert_error(capsys, ["predict", "tiny-text", path], "takes text", "pass the texts themselves")


def test_predict_with_a_tabular_model_refuses_text(env, capsys):
    assert_error(
        capsys, ["predict", "clinical-mlp", "some text"], "does not take text", "8 numeric input features"
    )


def test_predict_images_without_pillow_is_a_clear_error(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n")
    assert_error(
        capsys, ["predict", "clinical-mlp", tmp_path / "scan.png"], "needs Pillow", "pip install pillow"
    )


def test_predict_images_builds_a_normalised_batch(env, capsys, tmp_path, monkeypatch):
    """Image decoding is Pillow's; this checks our part (modes, layout, scaling) with a stand-in."""
    monkeypatch.setenv("LIGHTNING_MTL_TRUSTED", "conftest")  # the backbone class lives in the tests
    pixels = {
        "a.png": np.arange(12, dtype=np.uint8).reshape(3, 4) * 20,
        "b.png": np.full((3, 4), 255, dtype=np.uint8),
    }

    class FakeImage:
        def __init__(self, array):
            self.array = array

        def convert(self, mode):
            assert mode == "L"
            return self

        def __array__(self, dtype=None, copy=None):
            return self.array.astype(dtype or self.array.dtype)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake_pil = types.ModuleType("PIL")
    fake_pil.Image = types.SimpleNamespace(open=lambda path: FakeImage(pixels[Path(path).name]))
    monkeypatch.setitem(sys.modules, "PIL", fake_pil)

    torch.manual_seed(0)
    module = MultiTaskModule(
        {"class_path": "conftest.ToyConvBackbone", "init_args": {"channels": 4}},
        [Task("lesion", kind="binary", labels=["no", "yes"])],
    ).eval()
    folder = save_pretrained(module, tmp_path / "conv", card=CARD)
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"].update({"image_mode": "L", "mean": [0.5], "std": [0.25]})
    (folder / "config.json").write_text(json.dumps(config))
    for name in pixels:
        (tmp_path / name).write_bytes(b"stand-in")

    result = run_json(capsys, "predict", folder, tmp_path / "a.png", tmp_path / "b.png")
    batch = torch.from_numpy(np.stack(list(pixels.values()))).float().div(255).unsqueeze(1)
    assert result["predictions"] == module.predict((batch - 0.5) / 0.25)


def test_predict_errors_exit_2_with_one_line(env, capsys, tmp_path):
    err = assert_error(
        capsys, ["predict", "tiny-txt", "hello"], "Unknown model 'tiny-txt'", "Did you mean 'tiny-text'"
    )
    assert "clinical-mlp" in err  # the available names are listed
    assert_error(capsys, ["predict", "clinical-mlp", tmp_path / "missing.csv"], "missing.csv: no such file")
    assert_error(capsys, ["predict", "recipe-only", tmp_path / "x.csv"], "no such file")
    write_csv(tmp_path / "x.csv", toy_tabular(2)["x"], FEATURES)
    assert_error(capsys, ["predict", "recipe-only", tmp_path / "x.csv"], "python recipes/clinical.py")
    assert_error(capsys, ["predict", "clinical-mlp", tmp_path / "x.csv", "more"], "must be the only INPUT")
    assert_error(capsys, ["zoo", "describe", "nope"], "Unknown model 'nope'")


def test_usage_errors_and_help(capsys):
    code, _, err = run(capsys, "zoo")
    assert code == 2 and "usage: lightning-mtl zoo" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "predict" in out and "export" in out


# --- export ---------------------------------------------------------------------------------------------
def test_export_turns_a_trainer_checkpoint_into_an_artifact(tmp_path, capsys):
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(8, hidden=(16,), dropout=0.0), TABULAR_TASKS[::3], lr=1e-2)
    data = {k: v for k, v in toy_tabular(64).items() if k in ("x", "risk", "stay")}
    trainer = fit(module, DataLoader(DictDataset(data), batch_size=16), steps=3)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    code, out, err = run(capsys, "export", ckpt, tmp_path / "release", "--card", "license=mit")
    assert code == 0, err
    assert f"Wrote {tmp_path / 'release'}" in out
    loaded = from_pretrained(tmp_path / "release")
    assert loaded.predict(data["x"][:4]) == module.predict(data["x"][:4])
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config["card"]["license"] == "mit"
    assert config["extra"]["checkpoint"]["global_step"] == 3


def test_export_errors(tmp_path, capsys):
    assert_error(
        capsys, ["export", tmp_path / "none.ckpt", tmp_path / "out"], "none.ckpt: no such checkpoint file"
    )
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    assert_error(capsys, ["export", tmp_path / "plain.ckpt", tmp_path / "out"], "not a Lightning checkpoint")
    assert_error(
        capsys, ["export", tmp_path / "plain.ckpt", tmp_path / "out", "--card", "license"], "KEY=VALUE"
    )


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-mtl") == "lightning_mtl.cli:main"
