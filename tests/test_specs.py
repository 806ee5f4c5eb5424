"""No code runs from data: every spec slot x every entry point refuses a hostile ``class_path`` before it
imports the module or calls anything (a canary file would appear if it did)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task, trust, trusted, untrust
from lightning_mtl.backbones import MLPBackbone
from lightning_mtl.cli import main as cli_main
from lightning_mtl.hub import ArtifactError, export_checkpoint, from_pretrained, save_pretrained
from lightning_mtl.specs import (
    ENV_VAR,
    UntrustedClassError,
    build_from_spec,
    is_trusted,
    resolve_class,
    trusted_packages,
)

CANARY_MODULE = "lmtl_canary_module"


@pytest.fixture
def canary(tmp_path, monkeypatch) -> dict[str, Any]:
    """Two hostile specs: one that would *call* ``os.system`` and one whose mere *import* writes a file."""
    ran, imported = tmp_path / "ran.canary", tmp_path / "imported.canary"
    (tmp_path / f"{CANARY_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(imported)!r}).touch()\nclass Evil:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return {
        "call": {"class_path": "os.system", "init_args": {"command": f"touch {ran}"}},
        "import": {"class_path": f"{CANARY_MODULE}.Evil"},
        "files": (ran, imported),
    }


def assert_nothing_ran(canary: dict[str, Any]) -> None:
    assert not any(f.exists() for f in canary["files"]), "hostile code ran"
    assert CANARY_MODULE not in sys.modules, "an untrusted module was imported"


# --- the slots: where a spec can sit in a module's hyper-parameters ----------------------------------------
def _tasks(loss: Any = None, metrics: Any = None) -> list[dict[str, Any]]:
    return [
        Task("risk", kind="binary", loss=loss, metrics=metrics).to_dict(),
        Task("stay", kind="regression").to_dict(),
    ]


SLOTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "backbone": lambda spec: {"backbone": spec},
    "loss": lambda spec: {"tasks": _tasks(loss=spec)},
    "metric": lambda spec: {"tasks": _tasks(metrics={"m": spec})},
    "balancer": lambda spec: {"balancer": spec},
}


def good_hparams() -> dict[str, Any]:
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), _tasks())
    return dict(module.hparams)


def write_checkpoint(path: Path, hparams: dict[str, Any]) -> Path:
    """A Lightning checkpoint of a good module whose hyper-parameters were then edited by an attacker."""
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), _tasks())
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


@pytest.mark.parametrize("payload", ["call", "import"])
@pytest.mark.parametrize("slot", sorted(SLOTS))
def test_constructor_refuses(slot, payload, canary):
    kwargs = {**good_hparams(), **SLOTS[slot](canary[payload])}
    with pytest.raises(UntrustedClassError, match="outside the trusted packages"):
        MultiTaskModule(**kwargs)
    assert_nothing_ran(canary)


@pytest.mark.parametrize("payload", ["call", "import"])
@pytest.mark.parametrize("slot", sorted(SLOTS))
def test_load_from_checkpoint_refuses(slot, payload, canary, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", {**good_hparams(), **SLOTS[slot](canary[payload])})
    with pytest.raises(UntrustedClassError, match="it was not imported"):
        MultiTaskModule.load_from_checkpoint(ckpt, weights_only=True)
    assert_nothing_ran(canary)


@pytest.mark.parametrize("payload", ["call", "import"])
@pytest.mark.parametrize("slot", sorted(SLOTS))
def test_export_checkpoint_refuses(slot, payload, canary, tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", {**good_hparams(), **SLOTS[slot](canary[payload])})
    with pytest.raises(ArtifactError, match=r"m\.ckpt: .*outside the trusted packages"):
        export_checkpoint(ckpt, tmp_path / "artifact")
    assert_nothing_ran(canary)
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("slot", sorted(SLOTS))
def test_cli_export_refuses(slot, canary, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", {**good_hparams(), **SLOTS[slot](canary["call"])})
    assert cli_main(["export", str(ckpt), str(tmp_path / "artifact")]) == 2
    assert "outside the trusted packages" in capsys.readouterr().err
    assert_nothing_ran(canary)


@pytest.mark.parametrize("payload", ["call", "import"])
@pytest.mark.parametrize("slot", [*sorted(SLOTS), "module_class"])
def test_artifact_refuses(slot, payload, canary, tmp_path):
    torch.manual_seed(0)
    module = MultiTaskModule(MLPBackbone(4, hidden=(8,), dropout=0.0), _tasks())
    folder = save_pretrained(module, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    if slot == "module_class":
        config["module_class"] = canary[payload]["class_path"]
    else:
        config["hparams"].update(SLOTS[slot](canary[payload]))
    (folder / "config.json").write_text(json.dumps(config))
    if slot == "module_class":  # never imported: the base class rebuilds the same weights, with a warning
        with pytest.warns(UserWarning, match="outside the trusted packages"):
            loaded = from_pretrained(folder)
        assert type(loaded) is MultiTaskModule
    else:
        with pytest.raises(ArtifactError, match="outside the trusted packages"):
            from_pretrained(folder)
    assert_nothing_ran(canary)


def test_recipe_cli_config_refuses(canary, tmp_path):
    """LightningCLI configs: a YAML/command-line spec reaches the module's constructor and its resolver."""
    from conftest import load_script

    recipe = load_script(Path(__file__).parents[1] / "recipes" / "nlp_sentiment_topic.py", register=True)
    args = [
        "--model.balancer",
        json.dumps(canary["call"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--zoo_dir",
        "",
    ]
    with pytest.raises(UntrustedClassError, match=r"'os\.system' is outside the trusted packages"):
        recipe.main(["--fast", *args])
    assert_nothing_ran(canary)


# --- the resolver itself -------------------------------------------------------------------------------------
def test_a_trusted_function_or_wrong_class_is_never_called(tmp_path):
    with pytest.raises(UntrustedClassError, match=r"'torch.save' is a function, not a class"):
        build_from_spec(
            {"class_path": "torch.save", "init_args": {"obj": 1, "f": str(tmp_path / "x")}}, nn.Module, "x"
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(UntrustedClassError, match=r"not a subclass of torch\.nn\.modules\.module\.Module"):
        build_from_spec({"class_path": "torch.Generator"}, nn.Module, "backbone")


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("Linear", "not a dotted"),
        ("torch..nn.Linear", "not a dotted"),
        ("torch.nn.Linear; import os", "not a dotted"),
        (42, "not a dotted"),
        ("this.Foo", "outside the trusted packages"),  # importing `this` prints the Zen of Python
        ("torchvision_evil.Foo", "outside the trusted packages"),  # a prefix of a trusted name is not trusted
    ],
)
def test_malformed_or_untrusted_paths(class_path, message, capsys):
    with pytest.raises(UntrustedClassError, match=message):
        resolve_class(class_path, nn.Module, "backbone")
    assert "Zen of Python" not in capsys.readouterr().out


def test_specs_hold_only_class_path_and_init_args():
    with pytest.raises(TypeError, match=r"\['run'\] are not allowed"):
        build_from_spec({"class_path": "torch.nn.Identity", "run": "x"}, nn.Module, "backbone")
    with pytest.raises(TypeError, match="'init_args' must be a dict"):
        build_from_spec({"class_path": "torch.nn.Identity", "init_args": ["x"]}, nn.Module, "backbone")


def test_trust_call_context_and_environment(monkeypatch):
    assert not is_trusted("my_project.models")
    with trusted("my_project"):
        assert is_trusted("my_project.models") and not is_trusted("my_projectx")
    assert not is_trusted("my_project.models")
    trust("my_project")
    try:
        assert "my_project" in trusted_packages()
    finally:
        untrust("my_project")
    monkeypatch.setenv(ENV_VAR, "pkg_a, pkg_b.sub")
    assert is_trusted("pkg_a.x") and is_trusted("pkg_b.sub.y") and not is_trusted("pkg_b.other")
    with pytest.raises(ValueError, match="dotted module name"):
        trust("bad name")


def test_a_trusted_user_class_builds_and_round_trips(tmp_path):
    """The user's own classes work once trusted: the documented way to load their checkpoints."""
    spec = {"class_path": "test_tasks.OnlyMean"}
    with pytest.raises(UntrustedClassError):
        MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression", loss=spec)])
    with trusted("test_tasks"):
        module = MultiTaskModule(MLPBackbone(4, hidden=(8,)), [Task("stay", kind="regression", loss=spec)])
        folder = save_pretrained(module, tmp_path / "model")
        loaded = from_pretrained(folder)
    assert type(loaded.units["stay"].loss_fn.fn).__name__ == "OnlyMean"


@pytest.mark.parametrize("slot", ["backbone", "balancer"])
def test_lightning_cli_parser_on_the_module_signature_refuses(slot, canary):
    """LightningCLI parses MultiTaskModule's own signature with jsonargparse: the spec arguments stay dicts
    (their types name no class to instantiate) and reach the resolver."""
    import warnings

    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultiTaskModule, "model")
    good = {"class_path": "lightning_mtl.backbones.MLPBackbone", "init_args": {"in_features": 3}}
    values = {"backbone": good, "balancer": "static", slot: canary["call"]}
    args = ["--model.tasks", json.dumps([{"name": "a", "kind": "binary"}])]
    args += [f"--model.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = parser.parse_args(args)
        with pytest.raises(UntrustedClassError, match=r"'os\.system' is outside the trusted packages"):
            parser.instantiate_classes(config)
    assert_nothing_ran(canary)
