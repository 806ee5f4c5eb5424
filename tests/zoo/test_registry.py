"""The model zoo: discovery from zoo folders, list/describe/load by name, folder or hub id, user entries,
entries whose weights come from a recipe, the schema check; and every entry of the repo's ``zoo/``."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TABULAR_TASKS, TINY_BERT, isolate_zoo, toy_tabular
from transformers import BertConfig

import lightning_mtl
from lightning_mtl import MultiTaskModule, Task, zoo
from lightning_mtl.backbones import PACKAGED_MINILM, HFEncoder, MLPBackbone
from lightning_mtl.hub import ArtifactError, save_pretrained
from lightning_mtl.zoo import registry

TEXTS = ["a calm and pleasant story", "the match ended in a draw", "markets fell sharply today"]
TEXT_TASKS = [
    Task("sentiment", kind="binary", labels=["neg", "pos"]),
    Task("topic", kind="multiclass", labels=["business", "sport", "world"]),
]
TAB_METRICS = {"risk": {"auroc": 0.875, "f1": 0.5}, "stay": {"mae": 1.25}}
TEXT_METRICS = {"sentiment": {"accuracy": 0.75}, "topic": {"accuracy": 0.5}}
RECIPE = "python recipes/clinical_risk.py --trainer.max_epochs 20"


def card(name: str, **fields: object) -> dict:
    return {
        "name": name,
        "description": f"The {name} test model.",
        "license": "apache-2.0",
        "datasets": ["toy/tabular"],
        "recipe": RECIPE,
        **fields,
    }


def x_tab(n: int = 6) -> torch.Tensor:
    return toy_tabular(n, seed=1)["x"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """A zoo folder with a tabular entry, a tiny text entry and an entry whose weights are not shipped."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    tab = MultiTaskModule(MLPBackbone(8, hidden=(32,), dropout=0.0), TABULAR_TASKS[::3]).eval()
    save_pretrained(tab, root / "clinical-risk-mlp", metrics=TAB_METRICS, card=card("clinical-risk-mlp"))
    encoder = HFEncoder.from_config(BertConfig(**TINY_BERT), tokenizer=PACKAGED_MINILM, max_length=32)
    text = MultiTaskModule(encoder, TEXT_TASKS).eval()
    save_pretrained(text, root / "tiny-text-news", metrics=TEXT_METRICS, card=card("tiny-text-news"))
    save_pretrained(
        tab, root / "clinical-recipe-only", metrics=TAB_METRICS, card=card("clinical-recipe-only")
    )
    (root / "clinical-recipe-only" / "model.safetensors").unlink()
    (root / "notes").mkdir()  # no config.json: not an entry
    (root / "notes" / "todo.txt").write_text("train more models")
    shutil.copytree(root / "clinical-risk-mlp", root / ".clinical-risk-mlp.tmp-0123")  # an interrupted save
    return SimpleNamespace(root=root, tab=tab, text=text)


@pytest.fixture
def isolated(built, monkeypatch) -> SimpleNamespace:
    """The zoo is exactly ``built.root``: no repo entries, no user entries from other tests."""
    isolate_zoo(monkeypatch, built.root)
    return built


NAMES = ["clinical-recipe-only", "clinical-risk-mlp", "tiny-text-news"]


# --- discovery and listing ------------------------------------------------------------------------------
def test_list_models_discovers_env_folder_entries_and_filters(isolated):
    assert zoo.list_models() == NAMES
    assert zoo.list_models("*clinical*") == ["clinical-recipe-only", "clinical-risk-mlp"]
    assert zoo.list_models("tiny-*") == ["tiny-text-news"]
    assert zoo.list_models("nothing-*") == []


def test_discovery_follows_the_disk_and_the_environment(isolated, tmp_path, monkeypatch):
    other = tmp_path / "more"
    shutil.copytree(isolated.root / "clinical-risk-mlp", other / "copied-model")
    monkeypatch.setenv(zoo.ENV_VAR, f"{isolated.root}{os.pathsep}{other}")
    assert zoo.list_models() == sorted([*NAMES, "copied-model"])
    shutil.copytree(other / "copied-model", other / "added-later")
    assert "added-later" in zoo.list_models()  # no refresh needed
    monkeypatch.setenv(zoo.ENV_VAR, str(other))
    assert zoo.list_models() == ["added-later", "copied-model"]
    monkeypatch.delenv(zoo.ENV_VAR)
    assert zoo.list_models() == []


def test_zoo_dirs_parses_the_environment_variable(isolated, tmp_path, monkeypatch):
    sep = os.pathsep
    monkeypatch.setenv(zoo.ENV_VAR, f"{isolated.root}{sep}{sep}{tmp_path}{sep}{isolated.root}")
    assert zoo.zoo_dirs() == [isolated.root, tmp_path]  # empty parts skipped, duplicates once
    monkeypatch.setenv(zoo.ENV_VAR, str(tmp_path / "typo"))
    with pytest.raises(ValueError, match=r"\$LIGHTNING_MTL_ZOO lists .*typo.*not a directory"):
        zoo.list_models()


def test_repo_zoo_dir_is_the_checkout_zoo_folder():
    root = Path(lightning_mtl.__file__).resolve().parents[1]
    expected = root / "zoo" if (root / "zoo").is_dir() else None
    assert zoo.repo_zoo_dir() == expected
    if expected is not None:
        assert zoo.zoo_dirs()[0] == expected


def test_same_name_in_two_folders_raises_naming_both(isolated, tmp_path, monkeypatch):
    shutil.copytree(isolated.root / "clinical-risk-mlp", tmp_path / "clinical-risk-mlp")
    monkeypatch.setenv(zoo.ENV_VAR, f"{isolated.root}{os.pathsep}{tmp_path}")
    with pytest.raises(ValueError, match="Two zoo entries are named 'clinical-risk-mlp'") as err:
        zoo.list_models()
    assert str(isolated.root) in str(err.value) and str(tmp_path) in str(err.value)


# --- describe -------------------------------------------------------------------------------------------
def test_describe_reports_card_tasks_metrics_and_size(isolated):
    info = zoo.describe("clinical-risk-mlp")
    folder = isolated.root / "clinical-risk-mlp"
    assert info["name"] == "clinical-risk-mlp"
    assert info["description"] == "The clinical-risk-mlp test model."
    assert info["source"] == "env"
    assert info["path"] == str(folder.resolve())
    assert info["weights_present"] is True
    assert info["tasks"] == [
        {"name": "risk", "kind": "binary", "labels": ["low", "high"]},
        {"name": "stay", "kind": "regression", "labels": None},
    ]
    assert info["metrics"] == TAB_METRICS
    assert info["size_bytes"] == (folder / "model.safetensors").stat().st_size
    assert info["parameters"] == sum(t.numel() for t in isolated.tab.state_dict().values())
    assert (info["license"], info["datasets"], info["recipe"]) == ("apache-2.0", ["toy/tabular"], RECIPE)
    json.dumps(info)  # JSON-able, for `zoo describe --json`


def test_describe_an_entry_without_weights(isolated):
    info = zoo.describe("clinical-recipe-only")
    assert info["weights_present"] is False
    assert info["parameters"] is None
    assert info["size_bytes"] == zoo.describe("clinical-risk-mlp")["size_bytes"]  # from config.json
    assert info["recipe"] == RECIPE


# --- load -----------------------------------------------------------------------------------------------
def test_load_by_name_folder_or_path_predicts_like_the_original(isolated):
    folder = isolated.root / "clinical-risk-mlp"
    expected = isolated.tab.predict(x_tab())
    for ref in ("clinical-risk-mlp", str(folder), folder):
        module = zoo.load(ref)
        assert isinstance(module, MultiTaskModule) and not module.training
        assert module.predict(x_tab()) == expected


def test_load_text_model_by_name_predicts_text(isolated):
    module = zoo.load("tiny-text-news")
    assert not module.training
    assert module.predict(TEXTS) == isolated.text.predict(TEXTS)


def test_hub_id_goes_through_the_hub(isolated, monkeypatch):
    import huggingface_hub

    folder = isolated.root / "clinical-risk-mlp"
    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, **kw: str(folder / name))
    assert zoo.load("someone/clinical-risk-mlp").predict(x_tab()) == isolated.tab.predict(x_tab())
    assert calls == ["someone/clinical-risk-mlp"]
    info = zoo.describe("someone/clinical-risk-mlp")
    assert (info["source"], info["weights_present"], info["path"]) == ("hub", None, None)
    assert info["metrics"] == TAB_METRICS


def test_entry_without_weights_names_its_recipe(isolated):
    with pytest.raises(ArtifactError, match="produced by its recipe") as err:
        zoo.load("clinical-recipe-only")
    assert RECIPE in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_unknown_name_lists_the_entries_and_suggests(isolated):
    with pytest.raises(zoo.UnknownModelError) as err:
        zoo.load("clinical-risk-mpl")
    message = str(err.value)
    assert "Unknown model 'clinical-risk-mpl'" in message
    assert str(NAMES) in message
    assert "Did you mean 'clinical-risk-mlp'" in message
    with pytest.raises(zoo.UnknownModelError, match="Unknown model 'nope'"):
        zoo.describe("nope")


def test_missing_folder_is_an_artifact_error(isolated, tmp_path):
    with pytest.raises(ArtifactError, match="no such directory"):
        zoo.load(tmp_path / "nowhere")


def test_a_name_that_is_also_a_local_folder_is_ambiguous(isolated, tmp_path, monkeypatch):
    shutil.copytree(isolated.root / "tiny-text-news", tmp_path / "clinical-risk-mlp")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="both a zoo entry"):
        zoo.load("clinical-risk-mlp")
    assert zoo.get_entry("./clinical-risk-mlp").source == "path"


# --- user entries ---------------------------------------------------------------------------------------
def test_register_model_adds_a_loadable_entry(isolated, tmp_path):
    folder = shutil.copytree(isolated.root / "clinical-risk-mlp", tmp_path / "mine")
    entry = zoo.register_model("my-clinical", folder, description="My copy")
    assert entry.source == "user" and Path(entry.ref) == folder.resolve()
    assert zoo.list_models("my-*") == ["my-clinical"]
    info = zoo.describe("my-clinical")
    assert (info["description"], info["source"]) == ("My copy", "user")
    assert zoo.load("my-clinical").predict(x_tab()) == isolated.tab.predict(x_tab())
    zoo.unregister_model("my-clinical")
    assert zoo.list_models("my-*") == []


def test_duplicate_registration_raises_naming_the_existing_entry(isolated, tmp_path):
    folder = isolated.root / "clinical-risk-mlp"
    zoo.register_model("mine", folder)
    with pytest.raises(ValueError, match=r"'mine' already exists \(user entry at .*clinical-risk-mlp\)"):
        zoo.register_model("mine", isolated.root / "tiny-text-news")
    with pytest.raises(ValueError, match=r"'tiny-text-news' already exists \(env entry at "):
        zoo.register_model("tiny-text-news", folder)
    assert zoo.describe("mine")["path"] == str(folder.resolve())  # the first registration stands


def test_register_model_refuses_bad_names_and_refs(isolated, tmp_path):
    with pytest.raises(ValueError, match="zoo model name"):
        zoo.register_model("has space", isolated.root / "clinical-risk-mlp")
    with pytest.raises(ArtifactError, match=r"holds no config\.json"):
        zoo.register_model("empty", tmp_path)
    with pytest.raises(ArtifactError, match="no such directory"):
        zoo.register_model("missing", str(tmp_path / "nowhere"))
    remote = zoo.register_model("remote", "owner/some-model")
    assert remote.remote and remote.folder is None and zoo.list_models("remote") == ["remote"]
    with pytest.raises(zoo.UnknownModelError, match="not a user entry"):
        zoo.unregister_model("clinical-risk-mlp")


# --- the schema check -----------------------------------------------------------------------------------
def test_valid_entries_have_no_problems(isolated):
    for name in NAMES:
        assert zoo.validate_entry(isolated.root / name) == [], name


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value

    return edit


SCHEMA_CASES = {
    "missing key": (lambda c: c.pop("card"), "card: missing"),
    "newer schema": (_set("schema_version", 99), "schema_version: must be an integer from 1"),
    "other library": (_set("library", "name", "timm"), "library: must be"),
    "module class": (
        _set("module_class", "torch.nn.Linear"),
        "is not a subclass of lightning_mtl.module.MultiTaskModule",
    ),
    "bad kind": (
        _set("hparams", "tasks", 0, "kind", "binery"),
        "hparams.tasks[0].kind: unknown kind 'binery'",
    ),
    "label not str": (_set("hparams", "tasks", 0, "labels", ["low", 1]), "tasks[0].labels: must be a list"),
    "labels a string": (_set("hparams", "tasks", 0, "labels", "low,high"), "tasks[0].labels: must be a list"),
    "duplicate labels": (_set("hparams", "tasks", 0, "labels", ["low", "low"]), "duplicate labels"),
    "metric a string": (_set("metrics", "risk", "auroc", "0.9"), "metrics.risk.auroc: not a number: '0.9'"),
    "metric a bool": (_set("metrics", "risk", "f1", True), "metrics.risk.f1: not a number"),
    "metric of no task": (_set("metrics", "ghost", {"acc": 1.0}), "metrics.ghost: not a task"),
    "task without metric": (lambda c: c["metrics"].pop("stay"), "no metric recorded for task(s) ['stay']"),
    "no licence": (_set("card", "license", None), "card.license: missing"),
    "name mismatch": (_set("card", "name", "another-name"), "does not match the entry's folder name"),
    "datasets not list": (_set("card", "datasets", "toy"), "card.datasets: must be a list"),
    "bad sha256": (_set("weights", "sha256", "ABC123"), "weights.sha256: must be 64 lowercase hex"),
    "bytes mismatch": (_set("weights", "bytes", lambda b: b + 1), "weights.bytes: model.safetensors has"),
    "tensor list": (_set("weights", "tensors", lambda t: t[1:]), "weights.tensors: differ"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_validate_entry_catches_each_config_problem(isolated, tmp_path, case):
    edit, expected = SCHEMA_CASES[case]
    folder = shutil.copytree(isolated.root / "clinical-risk-mlp", tmp_path / "clinical-risk-mlp")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    problems = zoo.validate_entry(folder)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("no-weights-no-recipe", "no recipe says how to produce it"),
        ("no-readme", "README.md: missing"),
        ("bad-json", "config.json: is not valid JSON"),
    ],
)
def test_validate_entry_catches_file_problems(isolated, tmp_path, damage, expected):
    folder = shutil.copytree(isolated.root / "clinical-risk-mlp", tmp_path / "clinical-risk-mlp")
    if damage == "no-weights-no-recipe":
        (folder / "model.safetensors").unlink()
        config = json.loads((folder / "config.json").read_text())
        config["card"]["recipe"] = None
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "no-readme":
        (folder / "README.md").unlink()
    else:
        (folder / "config.json").write_text("{not json")
    problems = zoo.validate_entry(folder)
    assert len(problems) == 1 and expected in problems[0], problems


# --- every entry of the repository's zoo/ -----------------------------------------------------------
def _repo_entries() -> list[Path]:
    folder = registry.repo_zoo_dir()
    if folder is None:
        return []
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith((".", "_")) and (p / "config.json").is_file()
    )


REPO_ENTRIES = _repo_entries()
WITH_WEIGHTS = [p for p in REPO_ENTRIES if (p / "model.safetensors").is_file()]
WITHOUT_WEIGHTS = [p for p in REPO_ENTRIES if not (p / "model.safetensors").is_file()]


def example_inputs(module: MultiTaskModule, n: int = 3):
    """Inputs any entry of its backbone's family takes; extend this when the zoo gains a new family."""
    if getattr(module.backbone, "input_kind", None) == "table":  # raw rows, every value unknown (imputed)
        return [dict.fromkeys(module.backbone.pipeline.columns) for _ in range(n)]
    if callable(getattr(module.backbone, "preprocess", None)):
        return ["An example sentence.", "A second, somewhat longer example to exercise the padding.", "ok"][
            :n
        ]
    init = module.hparams["backbone"].get("init_args") or {}
    width = init.get("in_features")
    if isinstance(width, int):
        return torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    if isinstance(init.get("image_size"), list):  # images in [0, 1]
        shape = (n, init.get("in_channels", 1), *init["image_size"])
        return torch.rand(shape, generator=torch.Generator().manual_seed(0))
    pytest.fail(
        f"example_inputs() knows no inputs for {module.hparams['backbone']['class_path']}; add a case."
    )


@pytest.mark.parametrize("folder", REPO_ENTRIES, ids=lambda p: p.name)
def test_repo_entry_schema(folder):
    assert zoo.validate_entry(folder) == []
    assert folder.name in zoo.list_models()


@pytest.mark.slow  # loads the entry's pretrained base (e.g. the 88 MB packaged MiniLM)
@pytest.mark.parametrize("folder", WITH_WEIGHTS, ids=lambda p: p.name)
def test_repo_entry_loads_and_predicts(folder):
    module = zoo.load(folder.name)
    assert not module.training
    info = zoo.describe(folder.name)
    assert info["parameters"] == sum(t.numel() for t in module.state_dict().values())
    inputs = example_inputs(module)
    predictions = module.predict(inputs)
    assert list(predictions) == [t["name"] for t in info["tasks"]]
    for name, preds in predictions.items():
        task = module.tasks[name]
        assert len(preds) == len(inputs), name
        for pred in preds:
            if "label" in pred:
                assert pred["label"] in (task.labels or [pred["label"]]), name
                assert math.isclose(sum(pred["probabilities"].values()), 1.0, rel_tol=1e-4), name
            if "value" in pred:
                assert math.isfinite(pred["value"]), name


@pytest.mark.parametrize("folder", WITHOUT_WEIGHTS, ids=lambda p: p.name)
def test_repo_entry_without_weights_names_its_recipe(folder):
    recipe = json.loads((folder / "config.json").read_text())["card"]["recipe"]
    with pytest.raises(ArtifactError, match="produced by its recipe"):
        zoo.load(folder.name)
    assert zoo.describe(folder.name)["recipe"] == recipe
