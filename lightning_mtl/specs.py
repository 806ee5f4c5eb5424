"""Objects built from ``{"class_path", "init_args"}`` specs, safely: nothing runs from data.

A spec can come from a checkpoint, an artifact's ``config.json``, a CLI or YAML config: data that may
have been written by someone else. Every path that builds an object from a spec goes through
:func:`build_from_spec` (or :func:`resolve_class`), which

1. refuses a ``class_path`` whose module lies outside the trusted packages **before importing it**
   (importing runs a module's top-level code): by default ``torch``, ``torchmetrics``,
   ``transformers`` and ``lightning_mtl``; more through :func:`trust` or the ``LIGHTNING_MTL_TRUSTED``
   environment variable (comma-separated);
2. refuses anything that is not a class derived from the expected base (``nn.Module``, a
   :class:`~lightning_mtl.balancing.Balancer`, a ``torchmetrics.Metric``) **before calling it**: a
   function such as ``os.system`` or ``subprocess.run`` is never called.

Example:
    >>> from torch import nn
    >>> build_from_spec({"class_path": "torch.nn.Identity"}, nn.Module, "layer")
    Identity()
    >>> build_from_spec({"class_path": "os.system", "init_args": {"command": "echo hi"}}, nn.Module, "loss")
    Traceback (most recent call last):
    ...
    lightning_mtl.specs.UntrustedClassError: loss: class_path 'os.system' is outside the trusted packages ...
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, cast

T = TypeVar("T")

DEFAULT_TRUSTED: tuple[str, ...] = ("torch", "torchmetrics", "transformers", "lightning_mtl")
ENV_VAR = "LIGHTNING_MTL_TRUSTED"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_trusted_by_call: list[str] = []


class UntrustedClassError(ValueError):
    """A spec names a class outside the trusted packages, or something that is not a class of the
    expected base. Nothing was imported (first case) or called (both cases)."""


def _check_package_name(name: str) -> str:
    if not isinstance(name, str) or not _DOTTED.match(name):
        raise ValueError(
            f"A trusted package must be a dotted module name such as 'my_project', got {name!r}."
        )
    return name


def trust(*packages: str) -> None:
    """Trust more packages (or dotted sub-packages) as sources of classes named by specs.

    Call it once before loading checkpoints or artifacts whose specs name your own classes (a backbone,
    a loss, a module subclass in your project). For a command line, set ``LIGHTNING_MTL_TRUSTED``
    (comma-separated) instead. Trust only code you would import yourself.

    Example:
        >>> trust("my_project.models")
        >>> "my_project.models" in trusted_packages()
        True
        >>> untrust("my_project.models")
    """
    for name in packages:
        if _check_package_name(name) not in _trusted_by_call:
            _trusted_by_call.append(name)


def untrust(*packages: str) -> None:
    """Withdraw what :func:`trust` added (the defaults and the environment variable stay).

    Example:
        >>> trust("my_project"); untrust("my_project"); "my_project" in trusted_packages()
        False
    """
    for name in packages:
        if name in _trusted_by_call:
            _trusted_by_call.remove(name)


@contextmanager
def trusted(*packages: str) -> Iterator[None]:
    """Trust ``packages`` inside a ``with`` block only.

    Example:
        >>> with trusted("my_project"):
        ...     "my_project" in trusted_packages()
        True
    """
    added = [p for p in packages if _check_package_name(p) not in _trusted_by_call]
    trust(*added)
    try:
        yield
    finally:
        untrust(*added)


def trusted_packages() -> tuple[str, ...]:
    """The packages whose classes specs may name: the defaults, ``LIGHTNING_MTL_TRUSTED`` and :func:`trust`.

    Example:
        >>> trusted_packages()[:4]
        ('torch', 'torchmetrics', 'transformers', 'lightning_mtl')
    """
    from_env = [p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip()]
    names = [*DEFAULT_TRUSTED, *(_check_package_name(p) for p in from_env), *_trusted_by_call]
    return tuple(dict.fromkeys(names))


def is_trusted(module_name: str) -> bool:
    """Whether a module lies in a trusted package (a pure string test: nothing is imported).

    Example:
        >>> is_trusted("torch.nn"), is_trusted("torchvision"), is_trusted("os")
        (True, False, False)
    """
    return any(module_name == p or module_name.startswith(p + ".") for p in trusted_packages())


def _refusal(what: str, class_path: Any, problem: str) -> UntrustedClassError:
    return UntrustedClassError(f"{what}: class_path {class_path!r} {problem}")


def resolve_class(class_path: Any, base: type[T] | tuple[type, ...], what: str) -> type[T]:
    """The class a dotted ``"package.module.Class"`` path names, checked before import and before use.

    ``base``: the class (or classes) it must derive from. ``what`` names the slot in errors
    (``"Task 'risk' loss"``, ``"balancer"``, ...).

    Example:
        >>> import torchmetrics
        >>> resolve_class("torchmetrics.MeanMetric", torchmetrics.Metric, "metric").__name__
        'MeanMetric'
    """
    if not isinstance(class_path, str) or not _DOTTED.match(class_path) or "." not in class_path:
        raise _refusal(what, class_path, "is not a dotted 'package.module.Class' path.")
    module_name, _, attr = class_path.rpartition(".")
    if not is_trusted(module_name):
        raise _refusal(
            what,
            class_path,
            f"is outside the trusted packages {list(trusted_packages())}; it was not imported. If you trust "
            f"the code that wrote this spec, call lightning_mtl.trust({module_name.split('.')[0]!r}) or set "
            f"{ENV_VAR}={module_name.split('.')[0]} first.",
        )
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"{what}: cannot import {class_path!r}: {err}") from err
    bases = base if isinstance(base, tuple) else (base,)
    expected = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
    if not isinstance(obj, type):
        raise _refusal(
            what, class_path, f"is a {type(obj).__name__}, not a class; expected a subclass of {expected}."
        )
    if not issubclass(obj, bases):
        raise _refusal(what, class_path, f"is not a subclass of {expected}; it was not called.")
    return cast("type[T]", obj)


def build_from_spec(spec: Any, base: type[T] | tuple[type, ...], what: str) -> T:
    """Instantiate a LightningCLI-style ``{"class_path": ..., "init_args": {...}}`` spec whose class
    derives from ``base`` (see :func:`resolve_class`); ``init_args`` must be a mapping with string keys.

    Example:
        >>> from torch import nn
        >>> build_from_spec({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 1}},
        ...                 nn.Module, "head")
        Linear(in_features=2, out_features=1, bias=True)
    """
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise TypeError(
            f"{what}: expected a dict with 'class_path' (and optional 'init_args'), got {spec!r}."
        )
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise TypeError(f"{what}: a spec holds 'class_path' and 'init_args' only; {unknown} are not allowed.")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping) or not all(isinstance(k, str) for k in init_args):
        raise TypeError(f"{what}: 'init_args' must be a dict of argument names to values, got {init_args!r}.")
    cls = resolve_class(spec["class_path"], base, what)
    return cls(**dict(init_args))


def check_specs(value: Any, base: type | tuple[type, ...], what: str) -> None:
    """Resolve every ``class_path`` nested anywhere in ``value`` (a config) without calling anything.

    Example:
        >>> from torch import nn
        >>> check_specs({"backbone": {"class_path": "torch.nn.Identity"}, "lr": 0.1}, nn.Module, "config")
    """
    if isinstance(value, Mapping):
        if "class_path" in value:
            resolve_class(value["class_path"], base, what)
        for item in value.values():
            check_specs(item, base, what)
    elif isinstance(value, list | tuple):
        for item in value:
            check_specs(item, base, what)
