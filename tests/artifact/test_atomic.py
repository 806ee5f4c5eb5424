"""Atomic saves: a process saving over an artifact is killed (SIGKILL) at every file-system step in turn
(each rename, exchange, fsync, unlink, rmdir) and in the middle of writing the tensors; after each kill the
path loads exactly the old or the new weights, and the next save leaves no temporary folders behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TABULAR_TASKS
from safetensors.torch import load_file

from lightning_mtl import MultiTaskModule
from lightning_mtl.artifact import _files, _save, from_pretrained, save_pretrained
from lightning_mtl.backbones import MLPBackbone

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child process (POSIX only)")

STEPS = ("rename", "replace", "unlink", "rmdir", "fsync")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def tiny(seed: int) -> MultiTaskModule:
    torch.manual_seed(seed)
    return MultiTaskModule(MLPBackbone(8, hidden=(4,), dropout=0.0), TABULAR_TASKS[:1]).eval()


def save_killed_at(step: int, module: MultiTaskModule, target: Path, *, exchange: bool) -> bool:
    """Save ``module`` to ``target`` in a forked child that SIGKILLs itself just before its ``step``-th
    file-system call (``step=0``: half-way through writing the tensors); ``True`` if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def die() -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            def counted(fn):
                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        die()
                    return fn(*args, **kwargs)

                return wrapper

            for name in STEPS:
                setattr(os, name, counted(getattr(os, name)))
            _files.exchange = counted(_files.exchange) if exchange else (lambda a, b: False)
            if step == 0:
                real_save_file = _save.save_file

                def torn_write(tensors, filename, metadata=None):
                    real_save_file(tensors, filename, metadata=metadata)
                    size = os.path.getsize(filename)
                    os.truncate(filename, size // 2)
                    die()

                _save.save_file = torn_write
            save_pretrained(module, target)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0
    return False


def same_weights(loaded: MultiTaskModule, module: MultiTaskModule) -> bool:
    state = module.state_dict()
    return all(torch.equal(t, state[n]) for n, t in loaded.state_dict().items())


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-away"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path, exchange):
    if exchange and _files._RENAMEAT2 is None:
        pytest.skip("renameat2 is not available on this system")
    old, new = tiny(0), tiny(1)
    target = save_pretrained(old, tmp_path / "model")
    seen = []
    for step in range(0, 100):
        killed = save_killed_at(step, new, target, exchange=exchange)
        loaded = from_pretrained(target)  # may first recover the old folder (rename-away mode)
        is_old, is_new = same_weights(loaded, old), same_weights(loaded, new)
        assert is_old != is_new, f"killed at step {step}: neither the old nor the new weights"
        seen.append("new" if is_new else "old")
        if not killed:
            break
        # The next save cleans up the killed one's folders, and restores the old artifact for the next step.
        save_pretrained(old, target)
        assert leftovers(tmp_path) == [], step
        assert same_weights(from_pretrained(target), old)
    else:
        pytest.fail("the save was still killed after 100 steps")
    # Every step was tried: the path switches from old to new exactly once, at the swap.
    assert len(seen) > 8 and seen[0] == "old" and seen[-1] == "new"
    assert seen == sorted(seen, key=lambda s: s == "new"), seen
    remaining = leftovers(tmp_path)
    assert remaining == [], remaining


def test_leftovers_of_a_live_save_and_foreign_folders_are_kept(tmp_path):
    target = save_pretrained(tiny(0), tmp_path / "model")
    live = tmp_path / f".model.tmp-{os.getppid()}-0123abcd"  # a live process (the parent of this one)
    live.mkdir()
    (live / "config.json").write_text("{}")
    foreign = tmp_path / ".model.tmp-999999999-0123abcd"  # a dead writer, but not our files
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    dead = tmp_path / ".model.old-999999999-89abcdef"  # a dead writer's folder of artifact files
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x")
    save_pretrained(tiny(1), target)
    assert live.is_dir() and (foreign / "notes.txt").read_text() == "precious"
    assert not dead.exists()
    assert set(load_file(target / "model.safetensors")) == set(tiny(1).state_dict())


def test_the_zoo_recovers_an_artifact_left_renamed_away(tmp_path):
    from lightning_mtl import zoo

    target = save_pretrained(tiny(0), tmp_path / "model")
    os.rename(target, tmp_path / ".model.old-999999999-0123abcd")  # killed between the two renames
    entry = zoo.get_entry(str(target))
    assert entry.folder == target and same_weights(zoo.load(entry), tiny(0))
    assert leftovers(tmp_path) == []
