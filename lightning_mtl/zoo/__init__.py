"""The model zoo: named release artifacts you can list, describe and load by name.

An entry is a release artifact folder (``config.json`` + ``model.safetensors`` + ``README.md``, see
:mod:`lightning_mtl.hub`) inside a zoo folder: the ``zoo/`` folder of a source checkout, or a folder
listed in ``$LIGHTNING_MTL_ZOO``. Its name is the folder's name. Add one by saving an artifact there
(``module.save_pretrained("zoo/<name>", card={...}, metrics={...})``), or register any folder or hub id
with :func:`register_model`. :func:`load` takes a zoo name, a folder or a hub id alike;
:func:`read_inputs` turns texts, a CSV file or image files into what the model's ``predict`` takes.

Example:
    >>> from lightning_mtl import zoo
    >>> zoo.list_models("no-such-model-*")
    []
"""

from lightning_mtl.zoo.inputs import InputError, read_inputs
from lightning_mtl.zoo.registry import (
    ENV_VAR,
    UnknownModelError,
    ZooEntry,
    describe,
    get_entry,
    list_models,
    load,
    register_model,
    repo_zoo_dir,
    unregister_model,
    zoo_dirs,
)
from lightning_mtl.zoo.schema import validate_entry

__all__ = [
    "ENV_VAR",
    "InputError",
    "UnknownModelError",
    "ZooEntry",
    "describe",
    "get_entry",
    "list_models",
    "load",
    "read_inputs",
    "register_model",
    "repo_zoo_dir",
    "unregister_model",
    "validate_entry",
    "zoo_dirs",
]
