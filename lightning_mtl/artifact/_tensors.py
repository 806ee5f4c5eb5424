"""Tensor checks: the safetensors header, the tensor set and shapes against the rebuilt module, and the
fingerprint of a ``trainable_only`` artifact's base weights."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mtl.artifact._layout import ArtifactError


def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise ArtifactError(
            path, f"is truncated or corrupt and cannot be parsed as safetensors ({err})."
        ) from None


def _contiguous_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict on CPU, contiguous, with tensors that share memory cloned (safetensors refuses those)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _fingerprint(tensors: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """SHA-256 over the sorted names, dtypes, shapes and bytes; plus each tensor's shape, dtype and digest."""
    total = hashlib.sha256()
    each: dict[str, Any] = {}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = list(t.shape)
        data = t.reshape(-1).view(torch.uint8).numpy().data
        total.update(f"{name}\0{dtype}\0{shape}\0".encode())
        total.update(data)
        each[name] = {"shape": shape, "dtype": dtype, "sha256": hashlib.sha256(data).hexdigest()}
    return total.hexdigest(), each


def _check_tensors(
    path: Path,
    want: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    strict: bool,
    in_file: Mapping[str, str] | None = None,
) -> None:
    """``in_file``: today's name -> the name stored in the file, for tensors of an earlier layout (named as
    the file names them in the messages)."""
    named = in_file or {}
    missing = sorted(set(want) - set(found))
    extra = sorted(named.get(n, n) for n in set(found) - set(want))
    shapes = [
        f"{named.get(n, n)}: expected {want[n]}, found {found[n]}"
        for n in sorted(set(want) & set(found))
        if want[n] != found[n]
    ]
    if shapes:
        raise ArtifactError(
            path, "shape mismatch with the module rebuilt from config.json: " + "; ".join(shapes)
        )
    if missing or extra:
        problem = "does not hold exactly the tensors of the module rebuilt from config.json: " + "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
            )
            if part
        )
        if strict:
            raise ArtifactError(
                path,
                problem + ". Pass strict=False to load anyway (missing tensors stay randomly initialised).",
            )
        rank_zero_warn(
            f"{path}: {problem} (strict=False: missing tensors keep their random initialisation, unexpected ones are ignored)."
        )


def _check_base(path: Path, base: dict[str, Any], state: Mapping[str, Tensor], strict: bool) -> None:
    recorded: dict[str, Any] = base["tensors"]
    missing = sorted(n for n in recorded if n not in state)
    shapes = [
        f"{n}: expected {tuple(r['shape'])}, found {tuple(state[n].shape)}"
        for n, r in sorted(recorded.items())
        if n in state and list(state[n].shape) != list(r["shape"])
    ]
    if missing or shapes:
        raise ArtifactError(
            path,
            f"the base model {base['ref']!r} does not have the architecture this artifact was trained on: "
            + "; ".join(p for p in (f"missing tensors {missing}" if missing else "", "; ".join(shapes)) if p),
        )
    fingerprint, tensors = _fingerprint({n: state[n] for n in recorded})
    if fingerprint == base["fingerprint"]:
        return
    changed = sorted(
        n
        for n, r in recorded.items()
        if tensors[n]["sha256"] != r.get("sha256") or tensors[n]["dtype"] != r.get("dtype")
    )
    problem = (
        f"the base model {base['ref']!r} does not match the one this artifact was trained on: fingerprint "
        f"{fingerprint} != recorded {base['fingerprint']}; {len(changed)} of {len(recorded)} base tensors differ: "
        f"{changed[:10]}{' ...' if len(changed) > 10 else ''}"
    )
    if strict:
        raise ArtifactError(path, problem + ". Use the original base, or pass strict=False to load anyway.")
    rank_zero_warn(f"{path}: {problem} (strict=False: loading anyway).")
