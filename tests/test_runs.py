"""The recipes' command-line helpers."""

from __future__ import annotations

import logging
import shlex
import warnings

from lightning_mtl.runs import command_line, expand_fast, quiet_lightning


def test_fast_expands_first_so_later_flags_win_and_never_overwrites_the_zoo():
    fast = ["--seeds=[0]", "--data.limit=600"]
    assert expand_fast(["--data.limit=50", "--fast"], fast) == [*fast, "--data.limit=50", "--zoo_dir="]
    assert expand_fast(["--fast", "--zoo_dir=/tmp/z"], fast) == [*fast, "--zoo_dir=/tmp/z"]
    assert expand_fast(["--seeds=[3]"], fast) == ["--seeds=[3]"]


def test_command_line_round_trips_through_the_shell():
    args = ["--fast", "--model.balancer", '{"name": "nash_mtl", "update_every": 5}', "--output_dir=a b"]
    line = command_line("python recipes/x.py", args)
    assert shlex.split(line) == ["python", "recipes/x.py", *args]


def test_quiet_lightning_silences_the_per_fit_banners():
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.INFO)
    with warnings.catch_warnings():
        quiet_lightning()
        assert logging.getLogger("lightning.pytorch.utilities.rank_zero").level == logging.WARNING
        assert logging.getLogger("lightning.fabric.utilities.seed").level == logging.WARNING
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning, stacklevel=1)
        assert caught == []
