"""The artifact folder's layout (file names, schema version) and the one error every artifact problem raises."""

from __future__ import annotations

import os
import re

SCHEMA_VERSION = 1
"""The ``config.json`` schema this version writes; loading refuses newer ones."""

LIBRARY_NAME = "lightning-mtl"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_MODULE_CLASS = "lightning_mtl.module.MultiTaskModule"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

PathLike = str | os.PathLike[str]


class ArtifactError(ValueError):
    """A release artifact (or a file in it) cannot be written or loaded; names the file and the problem.

    Example:
        >>> str(ArtifactError("model/config.json", "missing."))
        'model/config.json: missing.'
    """

    def __init__(self, file: PathLike, problem: str) -> None:
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")
