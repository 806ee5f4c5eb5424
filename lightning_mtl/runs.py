"""What the recipe scripts share as command-line programs: ``--fast``, the command to record, quiet logs."""

from __future__ import annotations

import logging
import shlex
import warnings
from collections.abc import Sequence


def expand_fast(argv: Sequence[str], fast_args: Sequence[str]) -> list[str]:
    """``argv`` with ``--fast`` replaced by ``fast_args`` (flags given after it still win). A smoke run never
    overwrites the real zoo entry: ``--zoo_dir=`` is added unless ``argv`` sets it.

    Example:
        >>> expand_fast(["--fast", "--seeds=[1]"], ["--seeds=[0]", "--trainer.max_epochs=1"])
        ['--seeds=[0]', '--trainer.max_epochs=1', '--seeds=[1]', '--zoo_dir=']
        >>> expand_fast(["--seeds=[1]"], ["--seeds=[0]"])
        ['--seeds=[1]']
    """
    argv = list(argv)
    if "--fast" not in argv:
        return argv
    argv = [*fast_args, *(a for a in argv if a != "--fast")]
    if not any(a.startswith("--zoo_dir") for a in argv):
        argv.append("--zoo_dir=")
    return argv


def command_line(command: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a run: ``command`` and the arguments as given, quoted.

    Example:
        >>> command_line("python recipes/x.py", ["--fast", "--model.balancer", '{"name": "famo"}'])
        'python recipes/x.py --fast --model.balancer \\'{"name": "famo"}\\''
    """
    return command + "".join(f" {shlex.quote(a)}" for a in argv)


def quiet_lightning() -> None:
    """Silence what Lightning prints at every fit (accelerator banner, tips, seeds, "max_epochs reached")
    and two deprecation warnings of its internals: a recipe runs a dozen short fits."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
