"""Project promises: .ci/run runs the README's install and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)


def test_ci_runs_the_readme_commands():
    install, test = readme_commands()[:2]
    assert install.endswith("&& python recipes/nlp_sentiment_topic.py")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.removesuffix(" && python recipes/nlp_sentiment_topic.py") in ci.splitlines()
    assert test in ci.splitlines()
    assert "pip install torch==2.13.0" in install  # the CPU wheel is pinned before anything pulls torch
