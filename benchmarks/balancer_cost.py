"""Per-step time and peak step memory of every balancer, relative to ``equal`` and two reference floors.

Workload (fixed): a shared MLP 512->1024->1024->512 (ReLU after each layer), batch 256, one
``Linear(512, 10)`` + cross-entropy head per task, SGD (lr 1e-3), float32, 2 threads, T = 2, 8, 32 tasks.
Every measurement (library x method x mode x T) runs in a fresh subprocess so that its peak memory can
be read on CPU: the RSS after setup (model, data, optimizer built) is subtracted from the peak RSS of the
steps (``VmHWM``, reset after setup through ``/proc/self/clear_refs``; not ``ru_maxrss``, which after
``exec`` still holds the parent's RSS at fork time).

Reference rows, measured in the same run: ``plain`` (summed losses, one backward) and ``floor``
(forward + one ``torch.autograd.grad`` per task through the backbone, rows summed into ``.grad``: the
least an exact per-task-gradient method can cost).

Commands::

    python benchmarks/balancer_cost.py                                # ours, T = 2 8 32
    python benchmarks/balancer_cost.py --compare --json cost.json     # + TorchJD and LibMTL
    python benchmarks/balancer_cost.py --tasks 2 --steps 3 --warmup 1 --methods equal 'pc*'
    python benchmarks/balancer_cost.py --batched                      # + jacobian="batched" variants

``--compare`` needs ``torchjd`` (the dev extra) and ``pip install --no-deps libmtl==1.1.5``.

On a GPU (``--device cuda``): models and data on the device, every measurement in this process (no RSS
tricks; ``--subprocess`` for one process each), each step timed between two ``torch.cuda.synchronize()``
(median of ``--steps``, default 20), memory = ``torch.cuda.max_memory_allocated()`` over the warm-up steps
(after ``reset_peak_memory_stats()``) minus the memory allocated after setup. ``--workload gpu``: MLP
1024->4096->4096->1024, batch 1024, ``Linear(1024, 10)`` heads, SGD, fp32. ``--modes params`` leaves out
the ``features`` rows::

    python benchmarks/balancer_cost.py --device cuda --workload gpu --compare --libraries ours,torchjd --modes params
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import importlib.metadata
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WIDTHS, CLASSES, BATCH, LR = (512, 1024, 1024, 512), 10, 256, 1e-3
# name -> (MLP widths, batch): "default" is the CPU workload of the README's tables, "gpu" the H200 one.
WORKLOADS: dict[str, tuple[tuple[int, ...], int]] = {
    "default": (WIDTHS, BATCH),
    "gpu": ((1024, 4096, 4096, 1024), 1024),
}
LOSS_TARGET, FEATURES_TARGET, FLOOR_TARGET = 1.05, 1.15, 1.10
Row = dict[str, Any]  # {"job": {...}, "result": {...}}
Step = Callable[[int], float]  # runs one step, returns the ms spent in the post-step hook (FAMO's re-forward)

# fmt: off
# Our method -> TorchJD aggregator (params mode only: TorchJD differentiates the shared parameters).
TORCHJD: dict[str, tuple[str, dict[str, Any]]] = {
    "floor": ("Sum", {}),       "equal": ("Mean", {}),            "mgda": ("MGDA", {}),
    "pcgrad": ("PCGrad", {}),   "gradvac": ("GradVac", {}),       "imtl": ("IMTLG", {}),
    "cagrad": ("CAGrad", {"c": 0.5}),  "nash_mtl": ("NashMTL", {}),  "aligned_mtl": ("AlignedMTL", {}),
    "upgrad": ("UPGrad", {}),   "graddrop": ("GradDrop", {}),
}
TORCHJD_REFERENCE = {"floor", "equal"}  # a full Jacobian + Sum/Mean: shown, not a like-for-like target
# Our method -> LibMTL 1.1.5 weighting, its kwargs, rep_grad (None: follow our mode). That release has no
# Nash-MTL, Aligned-MTL, FAMO or UPGrad. Our gradnorm measures norms at the features by default: rep_grad.
LIBMTL: dict[str, tuple[str, dict[str, Any], bool | None]] = {
    "equal": ("EW", {}, False),               "uncertainty": ("UW", {}, False),
    "dwa": ("DWA", {"T": 2.0}, False),        "rlw": ("RLW", {"dist": "Normal"}, False),
    "gls": ("GLS", {}, False),                "gradnorm": ("GradNorm", {"alpha": 1.5}, True),
    "mgda": ("MGDA", {"mgda_gn": "none"}, None),  "mgda_ub": ("MGDA", {"mgda_gn": "none"}, None),
    "pcgrad": ("PCGrad", {}, None),           "gradvac": ("GradVac", {"beta": 0.5}, None),
    "imtl": ("IMTL", {}, None),               "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}, None),
    "graddrop": ("GradDrop", {"leak": 0.0}, None),
}
# fmt: on
LIBMTL_ONLY = {"PCGrad": False, "GradVac": False, "CAGrad": False, "GradDrop": True}  # rep_grad it supports
LIBMTL_PATCHES = [
    "LibMTL.weighting and LibMTL.architecture are imported without LibMTL/__init__.py, which imports "
    "torchvision through LibMTL.model (installed with --no-deps).",
    "zero_grad_share_params() zeroes with encoder.zero_grad(set_to_none=False): on torch >= 2 the default sets "
    "the grads to None and _reset_grad() then fails writing param.grad.data (every gradient method).",
    "CAGrad is not patched: its objective hard-codes 3 tasks (x.reshape(1, 3)), so it fails for T != 3.",
    "model.epoch = 1 and train_loss_buffer = 1, so GradNorm takes its gradient path (epoch 0 is plain EW); "
    "DWA then uses weights 1 (same cost as its later epochs).",
]


# --- the workload ------------------------------------------------------------------------------------
@dataclass
class Workload:
    backbone: nn.Sequential
    heads: nn.ModuleList
    x: Tensor
    ys: list[Tensor]


def build_workload(
    tasks: int, seed: int, batch: int | None = None, workload: str = "default", device: str = "cpu"
) -> Workload:
    """The same seed gives every library the same initial weights and the same batch (made on the CPU, then
    moved to ``device``)."""
    widths, default_batch = WORKLOADS[workload]
    batch = batch or default_batch
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    heads = nn.ModuleList(nn.Linear(widths[-1], CLASSES) for _ in range(tasks))
    x = torch.randn(batch, widths[0])
    ys = [torch.randint(0, CLASSES, (batch,)) for _ in range(tasks)]
    return Workload(
        nn.Sequential(*layers).to(device), heads.to(device), x.to(device), [y.to(device) for y in ys]
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_plain(w: Workload, job: dict[str, Any]) -> Step:
    opt = torch.optim.SGD([*w.backbone.parameters(), *w.heads.parameters()], lr=LR)

    def step(i: int) -> float:
        feats = w.backbone(w.x)
        loss = sum(F.cross_entropy(h(feats), y) for h, y in zip(w.heads, w.ys))
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    return step


def setup_floor(w: Workload, job: dict[str, Any]) -> Step:
    shared = list(w.backbone.parameters())
    opt = torch.optim.SGD([*shared, *w.heads.parameters()], lr=LR)

    def step(i: int) -> float:
        feats = w.backbone(w.x)
        losses = [F.cross_entropy(h(feats), y) for h, y in zip(w.heads, w.ys)]
        total: list[Tensor] = []
        for t, (head, loss) in enumerate(zip(w.heads, losses)):
            own = list(head.parameters())
            grads = torch.autograd.grad(loss, [*shared, *own], retain_graph=t < len(losses) - 1)
            for p, g in zip(own, grads[len(shared) :]):
                p.grad = g
            total = list(grads[: len(shared)]) if t == 0 else [a.add_(g) for a, g in zip(total, grads)]
        for p, g in zip(shared, total):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    return step


def setup_ours(w: Workload, job: dict[str, Any]) -> Step:
    from lightning_mtl import MultiTaskModule, Task

    spec: dict[str, Any] = {"name": job["method"]}
    if job["mode"]:
        spec |= {"mode": job["mode"], "jacobian": job["jacobian"]}
    tasks = [
        Task(f"t{i}", kind="multiclass", labels=[str(c) for c in range(CLASSES)]) for i in range(job["T"])
    ]
    module = MultiTaskModule(
        w.backbone,
        tasks,
        balancer=spec,
        feature_dim=cast(nn.Linear, w.heads[0]).in_features,
        check_inputs=False,
        train_metrics=False,
    ).to(w.x.device)
    for i, head in enumerate(w.heads):
        cast(nn.Module, module.heads[f"t{i}"].proj).load_state_dict(head.state_dict())
    module.train()
    post_step = module.balancer.needs_post_step_losses  # FAMO: its re-forward is timed on its own
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer attached
    batch = {"x": w.x, **{f"t{i}": y for i, y in enumerate(w.ys)}}
    opt = torch.optim.SGD(module.parameters(), lr=LR)

    def step(i: int) -> float:  # Lightning's automatic optimization, without the Trainer
        loss = module.training_step(batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if post_step:
            _sync(w.x.device)
        start = time.perf_counter()
        module._refresh_after_step(batch)  # what MultiTaskModule.optimizer_step runs after the step
        if post_step:
            _sync(w.x.device)
        return (time.perf_counter() - start) * 1e3

    return step


def setup_torchjd(w: Workload, job: dict[str, Any]) -> Step:
    from torchjd import aggregation
    from torchjd.autojac import jac_to_grad, mtl_backward

    name, kwargs = TORCHJD[job["method"]]
    aggregator = getattr(aggregation, name)(**({"n_tasks": job["T"]} if name == "NashMTL" else kwargs))
    shared = list(w.backbone.parameters())
    task_params = [list(h.parameters()) for h in w.heads]
    opt = torch.optim.SGD([*shared, *w.heads.parameters()], lr=LR)

    def step(i: int) -> float:
        feats = w.backbone(w.x)
        losses = [F.cross_entropy(h(feats), y) for h, y in zip(w.heads, w.ys)]
        mtl_backward(losses, features=feats, tasks_params=task_params, shared_params=shared)
        jac_to_grad(shared, aggregator)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    return step


def libmtl_modules() -> tuple[Any, Any]:
    """``LibMTL.weighting`` and ``HPS``, without running ``LibMTL/__init__.py`` (it needs torchvision)."""
    import importlib
    import importlib.util
    import types

    if "LibMTL" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("LibMTL is not installed: pip install --no-deps libmtl==1.1.5")
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    weighting = importlib.import_module("LibMTL.weighting")
    return weighting, importlib.import_module("LibMTL.architecture.HPS").HPS


def setup_libmtl(w: Workload, job: dict[str, Any]) -> Step:
    import numpy as np

    weighting, hps = libmtl_modules()
    cls_name, weight_args, _ = LIBMTL[job["method"]]
    names = [f"t{i}" for i in range(job["T"])]
    decoders = nn.ModuleDict(dict(zip(names, w.heads)))

    class Model(hps, getattr(weighting, cls_name)):  # type: ignore[misc,valid-type]  # as LibMTL's Trainer does
        def __init__(self) -> None:
            super().__init__(names, lambda: w.backbone, decoders, job["rep_grad"], False, w.x.device)
            self.init_param()

        def zero_grad_share_params(self) -> None:  # patch: see LIBMTL_PATCHES
            self.encoder.zero_grad(set_to_none=False)

    model = Model()
    model.epoch, model.train_loss_buffer = 1, np.ones((len(names), 2))
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(i: int) -> float:  # LibMTL's Trainer.train loop body
        preds = model(w.x)
        losses = torch.zeros(len(names), device=w.x.device)
        for tn, name in enumerate(names):
            losses[tn] = F.cross_entropy(preds[name], w.ys[tn])
        opt.zero_grad()
        model.backward(losses, **weight_args)
        opt.step()
        return 0.0

    return step


SETUPS: dict[str, Callable[[Workload, dict[str, Any]], Step]] = {
    "plain": setup_plain,
    "floor": setup_floor,
    "ours": setup_ours,
    "torchjd": setup_torchjd,
    "libmtl": setup_libmtl,
}


# --- one measurement ---------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> bool:
    try:  # "5" resets VmHWM (Linux >= 4.0), so the peak read after the steps is theirs alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _heap_for_timing() -> bool:
    """Switch glibc malloc from the memory phase's low mmap threshold (set through the environment, so that
    freed buffers leave the RSS at once) to a steady-state heap: buffers up to 32 MiB are reused from the
    heap instead of being mapped and page-faulted afresh every step, as a long-running process's dynamic
    threshold would settle (glibc raises it up to 32 MiB as big buffers are freed). Timing under the low
    threshold charged every allocation a few page faults per 4 KiB: a cost of the measurement, not of the
    method."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1
        return ok and libc.mallopt(m_trim_threshold, 64 * 2**20) == 1
    except (OSError, AttributeError):
        return False


def measure(job: dict[str, Any], track_memory: bool = True) -> dict[str, Any]:
    """Build the job's model; run ``warmup`` steps (the memory phase: peak step memory) then, with the heap
    set for timing, one more untimed step and ``steps`` timed ones (median step time)."""
    torch.set_num_threads(job["threads"])
    setup = SETUPS[job["method"] if job["library"] == "ref" else job["library"]]
    device, workload = job.get("device", "cpu"), job.get("workload", "default")
    # Two steps on a tiny batch first: the code pages and lazy state they touch (on a GPU: the cuBLAS
    # handles and workspaces) are not step memory.
    if track_memory:
        prime = setup(build_workload(job["T"], job["seed"], 8, workload, device), job)
        for i in range(2):
            prime(i)
        del prime
    step = setup(build_workload(job["T"], job["seed"], None, workload, device), job)
    gc.collect()
    if device != "cpu":
        return _measure_device(job, step, track_memory)
    setup_mb = _status_mb("VmRSS")
    peak_reset = track_memory and _reset_peak()
    for i in range(job["warmup"]):
        step(i)
    # Not ru_maxrss: after exec it still holds the parent's RSS at fork time (the kernel's signal->maxrss).
    peak_mb = _status_mb("VmHWM") - setup_mb
    heap = _heap_for_timing() if track_memory else None
    step(job["warmup"])  # fills the heap under its new setting
    times, post = [], []
    for i in range(job["steps"]):
        start = time.perf_counter()
        post.append(step(job["warmup"] + 1 + i))
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "ok": True,
        "ms": statistics.median(times),
        "times_ms": times,
        "post_ms": statistics.median(post),
        "peak_mb": max(peak_mb, 0.0) if track_memory else None,
        "setup_mb": setup_mb,
        "peak_reset": peak_reset,  # False: the peak may include setup's
        "timing_heap": heap,  # False: timed under the memory phase's low mmap threshold
    }


def _measure_device(job: dict[str, Any], step: Step, track_memory: bool) -> dict[str, Any]:
    """``measure`` on a GPU: memory from the caching allocator's counters, each step timed between two
    ``torch.cuda.synchronize()``."""
    device = torch.device(job["device"])
    torch.cuda.synchronize(device)
    setup_mb = torch.cuda.memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(job["warmup"]):
        step(i)
    torch.cuda.synchronize(device)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 - setup_mb
    step(job["warmup"])
    times, post = [], []
    for i in range(job["steps"]):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        post.append(step(job["warmup"] + 1 + i))
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "ok": True,
        "ms": statistics.median(times),
        "times_ms": times,
        "post_ms": statistics.median(post),
        "peak_mb": max(peak_mb, 0.0) if track_memory else None,
        "setup_mb": setup_mb,
    }


def measure_safely(job: dict[str, Any], track_memory: bool = True) -> dict[str, Any]:
    try:
        return measure(job, track_memory)
    except Exception as err:  # reported as "failed: <reason>" in its row
        return {"ok": False, "error": f"{type(err).__name__}: {err}".replace("\n", " ")[:300]}
    finally:
        if job.get("device", "cpu") != "cpu":  # in-process on a GPU: the next job starts from an empty cache
            gc.collect()
            torch.cuda.empty_cache()


def run_job(job: dict[str, Any], in_process: bool, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh subprocess or in this process (no memory figure on CPU; the GPU's comes
    from the allocator's counters either way); never raises."""
    if in_process:
        return measure_safely(job, track_memory=job.get("device", "cpu") != "cpu")
    threads = str(job["threads"])  # a low mmap threshold returns big freed buffers to the OS at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": threads}
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])  # type: ignore[no-any-return]
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"ok": False, "error": tail[0]}


# --- planning and reporting --------------------------------------------------------------------------
def plan(args: argparse.Namespace, tasks: int) -> list[dict[str, Any]]:
    """The jobs of one T: the references, ours (``equal`` always; loss weighting first), then the other
    libraries' counterparts of each (TorchJD: params mode; LibMTL: where its rep_grad setting matches)."""
    from lightning_mtl.balancing.base import BALANCER_REGISTRY

    base = {
        "T": tasks,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "seed": args.seed,
        "device": args.device,
        "workload": args.workload,
    }
    refs = [{**base, "library": "ref", "method": m, "mode": "", "family": "ref"} for m in ("plain", "floor")]
    ours: list[dict[str, Any]] = []
    for name in BALANCER_REGISTRY.list():
        if name == "equal" or any(fnmatch.fnmatch(name, p) for p in args.methods):
            cls = BALANCER_REGISTRY.get(name)
            job = {
                **base,
                "library": "ours",
                "method": name,
                "family": cls.family,
                "mode": "",
                "jacobian": "loop",
            }
            if cls.family != "gradient":
                ours.append(job)
                continue
            supported = ("params", "features") if getattr(cls, "supports_features", True) else ("params",)
            for mode in (m for m in supported if m in args.modes):
                ours += [
                    {**job, "mode": mode, "jacobian": j} for j in ("loop", "batched")[: 1 + args.batched]
                ]
    ours.sort(key=lambda j: j["family"] == "gradient")
    libraries, theirs = args.libraries.split(","), []
    for job in [refs[1], *ours]:
        method, mode = job["method"], job["mode"]
        if job.get("jacobian", "loop") != "loop":
            continue
        if "torchjd" in libraries and method in TORCHJD and mode in ("", "params"):
            theirs.append({**job, "library": "torchjd"})
        if "libmtl" in libraries and method in LIBMTL and job["library"] == "ours":
            cls_name, _, rep = LIBMTL[method]
            rep = mode == "features" if rep is None else rep
            if LIBMTL_ONLY.get(cls_name, rep) == rep:
                theirs.append({**job, "library": "libmtl", "rep_grad": rep})
    return refs + ours + theirs


def _ms(result: dict[str, Any] | None) -> float | None:
    return result["ms"] if result and result.get("ok") else None


def _fmt(value: float | None, suffix: str = "", digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def targets(
    job: dict[str, Any], res: dict[str, Any], ref: dict[str, float | None], other: dict[str, Any]
) -> dict[str, bool]:
    """Which targets apply to one of our rows, and whether it meets them."""
    ms, out, equal, floor = res["ms"], {}, ref["equal"], ref["floor"]
    if job["family"] != "gradient" and equal:
        if job["method"] == "famo":  # its re-forward after the optimizer step is its required extra cost
            out["<=1.05x equal + re-forward"] = ms - res["post_ms"] <= LOSS_TARGET * equal
        else:
            out["<=1.05x equal"] = ms <= LOSS_TARGET * equal
    elif job["mode"] == "features" and equal:
        out["<=1.15x equal"] = ms <= FEATURES_TARGET * equal
    elif job["mode"] == "params" and floor:
        out["<=1.1x floor"] = ms <= FLOOR_TARGET * floor
    tj, lm = other["torchjd"], other["libmtl"]
    if _ms(tj) is not None and job["method"] not in TORCHJD_REFERENCE:
        out["< TorchJD"] = ms < tj["ms"]
        if res["peak_mb"] is not None and tj["peak_mb"] is not None:
            out["memory <= TorchJD"] = res["peak_mb"] <= tj["peak_mb"]
    if _ms(lm) is not None:
        out["< LibMTL"] = ms < lm["ms"]
    return out


def report(rows: list[Row], tasks: int, compare: bool) -> tuple[str, dict[str, dict[str, bool]]]:
    """The markdown table of one T, and ``{target: {row: met}}`` for our rows."""
    mine = [r for r in rows if r["job"]["T"] == tasks]
    by = {(r["job"]["library"], r["job"]["method"], r["job"]["mode"]): r["result"] for r in mine}
    ref = {k: _ms(by.get((lib, k, ""))) for lib, k in (("ref", "plain"), ("ref", "floor"), ("ours", "equal"))}
    head = ["method", "mode", "ms", "x plain", "x equal", "x floor", "peak MiB"]
    if compare:
        head += ["TorchJD ms", "ours/TorchJD", "TorchJD MiB", "LibMTL ms", "ours/LibMTL", "LibMTL MiB"]
    lines = ["| " + " | ".join([*head, "targets"]) + " |", "|" + "---|" * (len(head) + 1)]
    checks: dict[str, dict[str, bool]] = {}
    for row in (r for r in mine if r["job"]["library"] in ("ref", "ours")):
        job, res = row["job"], row["result"]
        mode = job["mode"] + (", batched" if job.get("jacobian") == "batched" else "")
        cells = [job["method"], mode]
        if not res.get("ok"):
            lines.append(
                "| " + " | ".join([*cells, f"failed: {res['error']}", *[""] * (len(head) - 2)]) + " |"
            )
            continue
        ms, exact = res["ms"], job["mode"] == "params" or job["method"] == "floor"
        cells += [
            _fmt(ms, digits=1),
            *(_fmt(ms / ref[k], "x") if ref[k] else "—" for k in ("plain", "equal")),
        ]
        cells += [
            _fmt(ms / ref["floor"], "x") if exact and ref["floor"] else "",
            _fmt(res["peak_mb"], digits=0),
        ]
        other = {lib: by.get((lib, job["method"], job["mode"])) for lib in ("torchjd", "libmtl")}
        for lib, theirs in other.items() if compare else ():
            if theirs is None or not theirs.get("ok"):
                cells += ["—" if theirs is None else f"failed: {theirs['error'][:100]}", "—", "—"]
            else:
                mark = "†" if lib == "torchjd" and job["method"] in TORCHJD_REFERENCE else ""
                cells += [
                    _fmt(theirs["ms"], mark, 1),
                    _fmt(ms / theirs["ms"], "x"),
                    _fmt(theirs["peak_mb"], digits=0),
                ]
        met = targets(job, res, ref, other) if job["library"] == "ours" else {}
        for name, ok in met.items():
            checks.setdefault(name, {})[f"T={tasks} {job['method']}" + (f" [{mode}]" if mode else "")] = ok
        missed = [name for name, ok in met.items() if not ok]
        cells.append(("✗ " + ", ".join(missed)) if missed else ("✓" if met else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--methods", nargs="+", default=["*"], help="fnmatch patterns (equal always runs)")
    parser.add_argument("--libraries", default=None, help="comma-separated: ours,torchjd,libmtl")
    parser.add_argument("--compare", action="store_true", help="same as --libraries ours,torchjd,libmtl")
    parser.add_argument("--batched", action="store_true", help='also jacobian="batched" (gradient methods)')
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["params", "features"],
        default=["params", "features"],
        help="the modes of the gradient methods' rows",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="default", help="gpu: the H200 MLP")
    parser.add_argument(
        "--subprocess",
        action="store_true",
        help="on cuda: one subprocess per measurement (default: in-process)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps, the median is reported (default: 10; on cuda 20)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first, over which the peak memory is read (>= 1)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (quick checks; no memory)")
    parser.add_argument("--json", metavar="PATH", help="save the raw results")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (20 if args.device == "cuda" else 10)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
        args.in_process = args.in_process or not args.subprocess
    if args.warmup < 1 or args.steps < 1:
        parser.error(
            "--warmup and --steps must be at least 1 (the peak memory is read over the warm-up steps)"
        )
    if args.worker:
        print(json.dumps(measure_safely(json.loads(args.worker))), flush=True)
        return []
    args.libraries = args.libraries or ("ours,torchjd,libmtl" if args.compare else "ours")
    versions = {"torch": str(torch.__version__)}
    if args.device == "cuda":
        versions["gpu"] = torch.cuda.get_device_name()
    for dist in ("torchjd", "libmtl"):
        if dist in args.libraries:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = "not installed"
    widths, batch = WORKLOADS[args.workload]
    memory = "peak CUDA allocated" if args.device == "cuda" else "peak RSS"
    print(
        f"# Balancer cost: batch {batch}, MLP {'-'.join(map(str, widths))}, {args.device}, {args.threads} threads, "
        f"{args.warmup} warm-up ({memory}) + 1 + {args.steps} timed steps (median), "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f", load average before: {os.getloadavg()[0]:.1f}\n"
    )
    rows: list[Row] = []
    checks: dict[str, dict[str, bool]] = {}

    def save() -> None:  # after every T, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                patches = LIBMTL_PATCHES if "libmtl" in args.libraries else []
                json.dump(
                    {"args": vars(args), "versions": versions, "libmtl_patches": patches, "rows": rows},
                    f,
                    indent=1,
                )

    for tasks in args.tasks:
        for job in plan(args, tasks):
            result = run_job(job, args.in_process, args.timeout)
            rows.append({"job": job, "result": result})
            shown = f"{result['ms']:.1f} ms" if result.get("ok") else f"failed: {result['error']}"
            label = " ".join(str(job.get(k, "")) for k in ("library", "method", "mode", "jacobian"))
            print(f"[T={tasks}] {label}: {shown}", file=sys.stderr, flush=True)
        table, found = report(rows, tasks, args.libraries != "ours")
        for name, met in found.items():
            checks.setdefault(name, {}).update(met)
        print(f"## T = {tasks}\n\n{table}\n", flush=True)
        save()
    print("## Targets\n")
    for name, met in checks.items():
        missed = [row for row, ok in met.items() if not ok]
        print(
            f"- {name}: met by {len(met) - len(missed)}/{len(met)} rows"
            + (f"; missed: {', '.join(missed)}" if missed else "")
        )
    if "libmtl" in args.libraries:
        print(
            "\n## LibMTL patches (in every LibMTL measurement)\n\n"
            + "\n".join(f"- {p}" for p in LIBMTL_PATCHES)
        )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    save()
    return rows


if __name__ == "__main__":
    main()
