"""Release artifacts: round trips, config.json and card contents, trainable-only artifacts against a base,
every refusal (pickles, corruption, schema, tensor sets, shapes), atomic writes, checkpoint export."""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TABULAR_TASKS, TINY_BERT, DictDataset, fit, toy_tabular
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import BertConfig

from lightning_mtl import MultiTaskModule, Task, __version__
from lightning_mtl.artifact import _files, _save
from lightning_mtl.backbones import PACKAGED_MINILM, HFEncoder
from lightning_mtl.hub import (
    SCHEMA_VERSION,
    ArtifactError,
    export_checkpoint,
    from_pretrained,
    save_pretrained,
)

TEXTS = ["a calm and pleasant story", "the match ended in a draw", "markets fell sharply today"]
TEXT_TASKS = [
    Task("sentiment", kind="binary", labels=["neg", "pos"]),
    Task("topic", kind="multiclass", labels=["business", "sport", "world"]),
]
CARD = {
    "license": "apache-2.0",
    "datasets": ["toy/tabular"],
    "training_data": "256 synthetic rows",
    "recipe": "recipes/tabular.py --steps 60",
    "intended_use": "Unit tests of the artifact format.",
    "limitations": "Random weights | not a real model.",
}
METRICS = {"risk": {"auroc": 0.875, "f1": 0.5}, "stay": {"mae": 1.25}}


def x_tab(n: int = 8) -> torch.Tensor:
    return toy_tabular(n, seed=1)["x"]


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Simulate training: move every trainable parameter so nothing equals its initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def rewrite_weights(folder: Path, mutate) -> None:
    """Change model.safetensors and record its new SHA-256, so only the checks after the hash can fire."""
    tensors = dict(load_file(folder / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["weights"]["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


class Payload:
    """Unpickling this creates ``marker``: proof that something was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def artifact(tmp_path, boring_module) -> Path:
    perturb(boring_module)
    return save_pretrained(boring_module, tmp_path / "boring", metrics=METRICS, card=CARD)


@pytest.fixture(scope="module")
def text_module() -> MultiTaskModule:
    torch.manual_seed(0)
    encoder = HFEncoder.from_config(BertConfig(**TINY_BERT), tokenizer=PACKAGED_MINILM, max_length=32)
    return MultiTaskModule(encoder, TEXT_TASKS).eval()


@pytest.fixture(scope="module")
def finetuned(tiny_bert_dir) -> MultiTaskModule:
    """A tiny pretrained BERT with embeddings and layer 0 frozen; layer 1 and the heads 'trained'."""
    torch.manual_seed(0)
    encoder = HFEncoder.from_pretrained(str(tiny_bert_dir), freeze_layers=1, max_length=32)
    module = MultiTaskModule(encoder, TEXT_TASKS)
    perturb(module)
    return module.eval()


# --- round trips ------------------------------------------------------------------------------------
def test_tabular_round_trip_predicts_identically(artifact, boring_module):
    loaded = from_pretrained(artifact)
    assert not loaded.training
    assert loaded.predict(x_tab()) == boring_module.predict(x_tab())
    for name, tensor in boring_module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_text_round_trip_via_module_methods(tmp_path, text_module):
    path = text_module.save_pretrained(tmp_path / "text")
    loaded = MultiTaskModule.from_pretrained(path)
    assert isinstance(loaded, MultiTaskModule)
    assert loaded.predict(TEXTS) == text_module.predict(TEXTS)
    assert (
        loaded.hparams["backbone"]["init_args"]["config"]
        == text_module.hparams["backbone"]["init_args"]["config"]
    )


# --- config.json and the card -------------------------------------------------------------------------
def test_config_json_contents(artifact, boring_module):
    config = json.loads((artifact / "config.json").read_text())
    assert config["schema_version"] == SCHEMA_VERSION == 1
    assert config["library"] == {"name": "lightning-mtl", "version": __version__}
    assert config["hparams"]["tasks"] == [t.to_dict() for t in boring_module.tasks.values()]
    assert config["hparams"]["backbone"] == boring_module.hparams["backbone"]
    assert config["metrics"] == METRICS
    assert config["card"]["license"] == "apache-2.0"
    assert config["card"]["recipe"] == CARD["recipe"]
    assert config["base"] is None
    weights = config["weights"]
    assert weights["file"] == "model.safetensors"
    assert weights["sha256"] == hashlib.sha256((artifact / "model.safetensors").read_bytes()).hexdigest()
    assert weights["tensors"] == sorted(boring_module.state_dict())
    assert weights["dtype"] == "float32"


def test_config_records_text_preprocessing_and_architecture(tmp_path, text_module):
    config = json.loads((save_pretrained(text_module, tmp_path / "t") / "config.json").read_text())
    assert config["preprocessing"]["tokenizer"] == PACKAGED_MINILM
    assert config["preprocessing"]["max_length"] == 32
    arch = config["hparams"]["backbone"]["init_args"]["config"]
    assert arch["model_type"] == "bert" and arch["hidden_size"] == TINY_BERT["hidden_size"]


def test_flat_lightning_metrics_are_grouped_by_task(tmp_path, boring_module):
    path = save_pretrained(
        boring_module, tmp_path / "m", metrics={"val/risk/auroc": 0.75, "val/stay/mae": float("nan")}
    )
    assert json.loads((path / "config.json").read_text())["metrics"] == {
        "risk": {"val/auroc": 0.75},
        "stay": {"val/mae": None},
    }
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        save_pretrained(boring_module, tmp_path / "m2", metrics={"nope": {"acc": 1.0}})


def test_model_card_front_matter_and_tables(artifact):
    readme = (artifact / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "lightning-mtl"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["toy/tabular"]
    assert "multi-task" in meta["tags"]
    assert "| risk | auroc | 0.875 |" in readme
    assert "| stay | mae | 1.25 |" in readme
    assert "| risk | binary | low, high | linear |" in readme
    assert "## Intended use\n\nUnit tests of the artifact format." in readme
    assert "## Limitations\n\nRandom weights | not a real model." in readme
    assert "recipes/tabular.py --steps 60" in readme


def test_card_rejects_unknown_fields(tmp_path, boring_module):
    with pytest.raises(ValueError, match="unknown field"):
        save_pretrained(boring_module, tmp_path / "m", card={"licence": "mit"})
    assert not (tmp_path / "m").exists()


def test_live_backbone_without_spec_is_refused(tmp_path):
    module = MultiTaskModule(torch.nn.Linear(8, 4), [TABULAR_TASKS[0]], feature_dim=4)
    with pytest.raises(ArtifactError, match=r"has no `spec\(\)`"):
        save_pretrained(module, tmp_path / "m")


# --- trainable-only artifacts ----------------------------------------------------------------------------
def test_trainable_only_is_small_and_round_trips_against_the_base(tmp_path, finetuned, tiny_bert_dir):
    with pytest.warns(UserWarning, match="tokenizer reference .* is a local path"):
        full = save_pretrained(finetuned, tmp_path / "full")
    with pytest.warns(UserWarning) as record:
        small = save_pretrained(finetuned, tmp_path / "small", trainable_only=True, base=str(tiny_bert_dir))
    assert any("base reference" in str(w.message) for w in record)
    size = (small / "model.safetensors").stat().st_size
    assert size * 10 < (full / "model.safetensors").stat().st_size
    config = json.loads((small / "config.json").read_text())
    assert config["base"]["ref"] == str(tiny_bert_dir)
    assert len(config["base"]["fingerprint"]) == 64
    stored = set(config["weights"]["tensors"])
    assert "backbone.model.embeddings.word_embeddings.weight" in config["base"]["tensors"]
    assert "backbone.model.encoder.layer.1.output.dense.weight" in stored
    assert {"units.sentiment.head.proj.weight", "units.topic.head.proj.weight"} <= stored
    assert not stored & set(config["base"]["tensors"])

    loaded = from_pretrained(small)
    assert loaded.predict(TEXTS) == finetuned.predict(TEXTS)
    assert from_pretrained(full).predict(TEXTS) == finetuned.predict(TEXTS)


def test_trainable_only_refuses_a_base_with_different_weights(tmp_path, finetuned, tiny_bert_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    with pytest.warns(UserWarning, match="local path"):
        small = save_pretrained(finetuned, tmp_path / "small", trainable_only=True, base=str(base))
    tensors = dict(load_file(base / "model.safetensors"))
    name = next(n for n in tensors if "word_embeddings" in n)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="fingerprint") as err:
        from_pretrained(small)
    assert "config.json" in str(err.value)
    assert "1 of" in str(err.value) and "word_embeddings" in str(err.value)
    with pytest.warns(UserWarning, match="fingerprint"):
        from_pretrained(small, strict=False)


def test_base_without_trainable_only_is_refused(tmp_path, boring_module):
    with pytest.raises(ValueError, match="only used with trainable_only=True"):
        save_pretrained(boring_module, tmp_path / "m", base="some/model")


def test_trainable_only_needs_a_base_reference(tmp_path, text_module):
    frozen = MultiTaskModule(
        HFEncoder(config=text_module.hparams["backbone"]["init_args"]["config"], freeze_layers=1), TEXT_TASKS
    )
    with pytest.raises(ValueError, match="base="):
        save_pretrained(frozen, tmp_path / "m", trainable_only=True)


# --- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "last.ckpt"])
def test_pickles_are_refused_without_unpickling(tmp_path, artifact, filename):
    marker = tmp_path / "unpickled.marker"
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(artifact / "config.json", folder / "config.json")
    (folder / filename).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ArtifactError, match="never unpickled") as err:
        from_pretrained(folder)
    assert filename in str(err.value) and "export_checkpoint" in str(err.value)
    with pytest.raises(ArtifactError, match="never unpickled"):
        from_pretrained(folder / filename)  # the file itself
    # A stray pickle next to model.safetensors is ignored, never opened.
    shutil.copy(folder / filename, artifact / filename)
    from_pretrained(artifact)
    assert not marker.exists()
    # The payload is live: unpickling it would have created the marker.
    pickle.loads((folder / filename).read_bytes())
    assert marker.exists()


def test_truncated_weights_are_refused(artifact):
    data = (artifact / "model.safetensors").read_bytes()
    (artifact / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.safetensors: is truncated or corrupt"):
        from_pretrained(artifact)


def test_sha256_mismatch_is_refused(artifact):
    path = artifact / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a byte of tensor data: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: SHA-256 mismatch"):
        from_pretrained(artifact)


def test_newer_schema_is_refused_naming_the_needed_version(artifact):
    def newer(config):
        config["schema_version"] = SCHEMA_VERSION + 1
        config["library"]["version"] = "9.9.0"

    edit_config(artifact, newer)
    with pytest.raises(
        ArtifactError, match=rf"config\.json: schema_version {SCHEMA_VERSION + 1} is newer"
    ) as err:
        from_pretrained(artifact)
    assert "lightning-mtl>=9.9.0" in str(err.value)


def test_missing_tensor_is_refused_by_name(artifact, boring_module):
    rewrite_weights(artifact, lambda t: t.pop("units.stay.head.proj.bias"))
    with pytest.raises(ArtifactError, match=r"missing \['units\.stay\.head\.proj\.bias'\]"):
        from_pretrained(artifact)
    with pytest.warns(UserWarning, match="units.stay.head.proj.bias"):
        loaded = from_pretrained(artifact, strict=False)
    assert torch.equal(loaded.heads["risk"].proj.weight, boring_module.heads["risk"].proj.weight)


def test_extra_tensor_is_refused_by_name(artifact):
    rewrite_weights(artifact, lambda t: t.update({"heads.ghost.weight": torch.zeros(2)}))
    with pytest.raises(ArtifactError, match=r"unexpected \['heads\.ghost\.weight'\]"):
        from_pretrained(artifact)


def test_shape_mismatch_is_refused_with_both_shapes(artifact):
    rewrite_weights(artifact, lambda t: t.update({"units.risk.head.proj.weight": torch.zeros(2, 32)}))
    with pytest.raises(
        ArtifactError, match=r"units\.risk\.head\.proj\.weight: expected \(1, 32\), found \(2, 32\)"
    ):
        from_pretrained(artifact, strict=False)  # shapes are never relaxed


def test_artifact_of_the_pre_unit_layout_loads(artifact, boring_module):
    """Artifacts saved before task units (``heads.<task>.*`` tensors) load into today's module, and their
    problems are reported under the file's own names."""

    def old_layout(tensors):
        for name in [n for n in tensors if n.startswith("units.")]:
            task, _, rest = name[len("units.") :].partition(".")
            tensors[f"heads.{task}.{rest.removeprefix('head.')}"] = tensors.pop(name)

    rewrite_weights(artifact, old_layout)
    assert any(n.startswith("heads.risk.") for n in load_file(artifact / "model.safetensors"))
    loaded = from_pretrained(artifact)
    x = torch.randn(5, 8)
    assert loaded.predict(x) == boring_module.eval().predict(x)
    rewrite_weights(artifact, lambda t: t.update({"heads.risk.proj.weight": torch.zeros(2, 32)}))
    with pytest.raises(
        ArtifactError, match=r"heads\.risk\.proj\.weight: expected \(1, 32\), found \(2, 32\)"
    ):
        from_pretrained(artifact)


def test_checkpoint_of_the_pre_unit_layout_loads(boring_module):
    old = {
        k.replace("units.", "heads.").replace(".head.", "."): v for k, v in boring_module.state_dict().items()
    }
    assert "heads.risk.proj.weight" in old and not any(k.startswith("units.") for k in old)
    fresh = MultiTaskModule(
        boring_module.backbone.__class__(8, hidden=(32,), dropout=0.0), TABULAR_TASKS[::3]
    )
    fresh.load_state_dict(old)  # strict: every old key found its new home
    assert torch.equal(fresh.heads["risk"].proj.weight, boring_module.heads["risk"].proj.weight)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "config.json: missing"),
        ("{not json", "config.json: is not valid JSON"),
        ('{"model_type": "bert"}', "transformers"),
    ],
)
def test_missing_or_broken_config_is_refused(artifact, content, message):
    if content is None:
        (artifact / "config.json").unlink()
    else:
        (artifact / "config.json").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        from_pretrained(artifact)


def test_config_cannot_call_arbitrary_callables(tmp_path, artifact):
    marker = tmp_path / "ran.marker"

    def hostile(config):
        config["hparams"]["backbone"] = {
            "class_path": "subprocess.run",
            "init_args": {"args": ["touch", str(marker)]},
        }

    edit_config(artifact, hostile)
    with pytest.raises(ArtifactError, match=r"'subprocess.run' is outside the trusted packages"):
        from_pretrained(artifact)
    assert not marker.exists()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="no such directory"):
        from_pretrained(tmp_path / "nowhere" / "model")


# --- atomic writes ---------------------------------------------------------------------------------------
def test_interrupted_first_save_leaves_nothing(tmp_path, boring_module, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(_save, "_render_card", boom)  # after model.safetensors and config.json are written
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(boring_module, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert leftovers(tmp_path) == []


def test_interrupted_resave_keeps_the_previous_artifact(tmp_path, artifact, boring_module, monkeypatch):
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}
    perturb(boring_module, scale=1.0)

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(_save, "_render_card", boom)
    with pytest.raises(RuntimeError, match="killed"):
        save_pretrained(boring_module, artifact)
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()

    real_rename = _files.os.rename

    def failing_final_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    # The rename-away/rename-in path (no atomic exchange): a failing second rename puts the old one back.
    monkeypatch.setattr(_files, "exchange", lambda a, b: False)
    monkeypatch.setattr(_files.os, "rename", failing_final_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(boring_module, artifact)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before  # moved aside, then restored
    assert leftovers(tmp_path) == []
    from_pretrained(artifact)


def test_resave_replaces_the_artifact(tmp_path, artifact, boring_module):
    perturb(boring_module, scale=1.0)
    save_pretrained(boring_module, artifact)
    assert from_pretrained(artifact).predict(x_tab()) == boring_module.predict(x_tab())
    assert leftovers(tmp_path) == []


def test_refuses_to_replace_a_folder_that_is_not_an_artifact(tmp_path, boring_module):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not a release artifact"):
        save_pretrained(boring_module, tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


# --- Lightning checkpoints --------------------------------------------------------------------------------
def test_export_checkpoint_drops_training_state(tmp_path, boring_module):
    data = {k: v for k, v in toy_tabular(128).items() if k in ("x", "risk", "stay")}
    trainer = fit(boring_module, DataLoader(DictDataset(data), batch_size=32), steps=5)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["optimizer_states"]

    path = export_checkpoint(ckpt, tmp_path / "release", card={"license": "mit"})
    loaded = from_pretrained(path)
    assert loaded.predict(data["x"][:8]) == boring_module.predict(data["x"][:8])
    config = json.loads((path / "config.json").read_text())
    assert set(load_file(path / "model.safetensors")) == set(boring_module.state_dict())
    assert config["extra"]["checkpoint"]["global_step"] == 5
    assert config["card"]["license"] == "mit"
    assert "optimizer" not in json.dumps(config)
    # AdamW keeps two moments per parameter: the artifact is far smaller than the checkpoint.
    assert (path / "model.safetensors").stat().st_size * 2 < ckpt.stat().st_size


def test_export_checkpoint_refuses_a_non_lightning_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ArtifactError, match="not a Lightning checkpoint"):
        export_checkpoint(tmp_path / "plain.pt", tmp_path / "out")


def test_module_class_of_a_script_subclass_is_its_importable_base(tmp_path):
    # A subclass defined in a script run as __main__ cannot be imported by name: record its base instead.
    namespace: dict = {"__name__": "__main__", "MultiTaskModule": MultiTaskModule}
    exec("class ScriptModule(MultiTaskModule):\n    pass\n", namespace)
    from lightning_mtl.backbones import MLPBackbone

    module = namespace["ScriptModule"](MLPBackbone(4, hidden=(8,)), [Task("risk", kind="binary")])
    path = save_pretrained(module, tmp_path / "a")
    assert (
        json.loads((path / "config.json").read_text())["module_class"]
        == "lightning_mtl.module.MultiTaskModule"
    )
