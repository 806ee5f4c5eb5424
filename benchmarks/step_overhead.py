"""Host syncs, dispatched ops and time of one steady-state training step under the stock Lightning ``Trainer``.

Every device->host sync (``.item()``, ``int()``/``bool()`` of a tensor, boolean-mask indexing) stalls a GPU
step. On CPU the profiler shows them as ``aten::_local_scalar_dense`` and ``aten::nonzero`` events; this script
counts them per training step for a plain ``LightningModule``, the ``floor`` of exact per-task-gradient
methods, and ``MultiTaskModule`` with every registered balancer.

Workload: an MLP backbone (``--widths``, default 64->128->128, ReLU after each layer), batch ``--batch`` (64),
T (``--tasks``, default 8) multiclass heads of 10 classes, random data served as dict batches
(``{"x": ..., "t0": ..., ...}``, CPU tensors that Lightning moves to the device). Trainer: the stock one
(default callbacks, progress bar included), a ``CSVLogger`` in a temporary folder, ``enable_checkpointing=False``,
``log_every_n_steps`` 50. Each row is one ``fit``: ``--warmup`` steps, then a timed window of ``--steps``
steps (no profiler), then a profiled window of ``--steps`` steps (default 50 = ``log_every_n_steps``, so each
window holds exactly one logger flush). Both windows are opened and closed by a callback at
``on_train_batch_start``, so every step in them is whole (forward, backward, optimizer step, logging).

Rows:

* ``plain``: the same backbone and heads, ``loss = sum of per-task cross-entropies``,
  ``self.log("train/loss", loss, prog_bar=True)``, AdamW over all parameters at the same lr;
* ``floor``: manual optimisation, one ``manual_backward(loss_t, retain_graph=True)`` per task (the least an
  exact per-task-gradient method costs), then the same optimizer step and log;
* every registered balancer with ``MultiTaskModule``'s defaults (gradient methods in their default mode, or
  in each of ``--modes``).

Columns: ``sync/step`` (``aten::_local_scalar_dense`` + ``aten::nonzero`` events per step) and ``of which
nonzero``; ``aten ops/step`` (aten events whose parent is not an aten op: the ops dispatched from Python,
autograd and the optimizer); ``ms/step`` (CPU: median step of the timed window; CUDA: the window's time
between two ``torch.cuda.synchronize()``, divided by its steps); each with its ratio to ``plain``. On CUDA
also: ``launches/step`` (``cudaLaunchKernel``, ``cudaLaunchKernelExC``, ``cuLaunchKernel(Ex)``,
``cudaGraphLaunch`` calls), ``cuda syncs/step`` (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
``cudaEventSynchronize`` calls), ``DtoH/step`` (device->host copies executed) and ``kernels/step`` (GPU
kernels executed).

Not counted as syncs: the host reads of the optimizer's own step counters (``.item()`` of a CPU tensor inside
``torch.optim``, outside the training closure; every row has them, per parameter, and on a GPU they read host
memory). The closure Lightning passes to ``optimizer.step`` is marked with a ``record_function``, so what
the training step does inside it is counted. ``--sites N`` (with Python stacks, slower) lists where the
syncs come from.

Targets (summarised after the tables): every loss-weighting balancer's sync/step <= ``plain``'s; every
gradient balancer's <= ``plain`` + 2; ``static``'s aten ops/step <= 1.2x ``plain``'s.

Commands::

    python benchmarks/step_overhead.py                                   # T = 8, every balancer, CPU
    python benchmarks/step_overhead.py --tasks 2 8 32 --train-metrics off --json overhead.json
    python benchmarks/step_overhead.py --methods static 'pc*' --modes params features --sites 5
    python benchmarks/step_overhead.py --device cuda                     # + launches, syncs, kernels

``measure(method, tasks, ...)`` runs one row and returns its figures (the test calls it).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import itertools
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

WIDTHS, BATCH, CLASSES, TASKS, LR = (64, 128, 128), 64, 10, 8, 1e-3
LOG_EVERY = 50  # Lightning's default log_every_n_steps
LOSS_SYNC_SLACK, GRADIENT_SYNC_SLACK, STATIC_ATEN_RATIO = 0, 2, 1.2
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
# Name prefixes (cudaLaunchKernel covers cudaLaunchKernelExC; cuLaunchKernel covers cuLaunchKernelEx).
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CLOSURE, CLOSE = "step_overhead::closure", "step_overhead::close_window"  # our record_function marks
PYTHON_FRAME = re.compile(r"^(?P<file>.+\.py)\((?P<line>\d+)\): (?P<func>.+)$")


# --- the workload ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """What every row shares: the task names, the backbone's widths and the batches."""

    tasks: int
    widths: tuple[int, ...] = WIDTHS
    batch: int = BATCH
    classes: int = CLASSES
    lr: float = LR

    @property
    def names(self) -> list[str]:
        return [f"t{i}" for i in range(self.tasks)]

    def backbone(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(self.widths):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        return nn.Sequential(*layers)

    def heads(self) -> nn.ModuleList:
        return nn.ModuleList(nn.Linear(self.widths[-1], self.classes) for _ in range(self.tasks))

    def batches(self, n: int, seed: int) -> list[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [
            {
                "x": torch.randn(self.batch, self.widths[0], generator=g),
                **{k: torch.randint(0, self.classes, (self.batch,), generator=g) for k in self.names},
            }
            for _ in range(n)
        ]


class PlainModule(L.LightningModule):
    """The two-line multi-task model: summed cross-entropies, one backward (automatic optimisation)."""

    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.backbone, self.heads, self.names, self.lr = w.backbone(), w.heads(), w.names, w.lr

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        feats = self.backbone(batch["x"])
        loss = sum(F.cross_entropy(h(feats), batch[n]) for h, n in zip(self.heads, self.names))
        self.log("train/loss", loss, prog_bar=True)  # type: ignore[arg-type]
        return loss  # type: ignore[return-value]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)  # MultiTaskModule's default


class FloorModule(PlainModule):
    """One backward per task (manual optimisation): the least an exact per-task-gradient method costs."""

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        feats = self.backbone(batch["x"])
        losses = [F.cross_entropy(h(feats), batch[n]) for h, n in zip(self.heads, self.names)]
        for loss in losses:
            self.manual_backward(loss, retain_graph=True)
        opt.step()  # type: ignore[union-attr]
        opt.zero_grad()  # type: ignore[union-attr]
        total = torch.stack(losses).sum().detach()
        self.log("train/loss", total, prog_bar=True)
        return total


def build_module(
    method: str, w: Workload, mode: str | None = None, train_metrics: bool | None = None
) -> L.LightningModule:
    """``plain``, ``floor``, or ``MultiTaskModule`` with the registered balancer ``method`` (its defaults,
    ``mode`` if given; ``train_metrics`` None: the module's default)."""
    if method == "plain":
        return PlainModule(w)
    if method == "floor":
        return FloorModule(w)
    from lightning_mtl import MultiTaskModule, Task

    tasks = [Task(n, kind="multiclass", labels=[str(c) for c in range(w.classes)]) for n in w.names]
    kwargs: dict[str, Any] = {"feature_dim": w.widths[-1], "lr": w.lr}
    if train_metrics is not None:
        kwargs["train_metrics"] = train_metrics
    balancer: str | dict[str, Any] = method if mode is None else {"name": method, "mode": mode}
    return MultiTaskModule(w.backbone(), tasks, balancer=balancer, **kwargs)


# --- the measurement ---------------------------------------------------------------------------------
class Windows(Callback):
    """Opens and closes the timed and the profiled windows at ``on_train_batch_start``."""

    def __init__(self, warmup: int, steps: int, timed: bool, cuda: bool, with_stack: bool) -> None:
        self.count, self.steps, self.cuda, self.with_stack = 0, steps, cuda, with_stack
        self.timed_start = warmup if timed else None
        self.profile_start = warmup + (steps if timed else 0)
        self.end = self.profile_start + steps
        self.marks: list[float] = []
        self.prof: profile | None = None
        self.profiling = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in trainer.optimizers:  # mark the training closure inside optimizer.step
            opt.register_step_pre_hook(_mark_closure)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        step, self.count = self.count, self.count + 1
        if self.timed_start is not None and self.timed_start <= step <= self.timed_start + self.steps:
            if self.cuda and step in (self.timed_start, self.timed_start + self.steps):
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
        if step == self.profile_start:
            if self.cuda:
                torch.cuda.synchronize()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities, with_stack=self.with_stack)
            self.prof.start()
            self.profiling = True
        elif step == self.end and self.prof is not None:
            with record_function(CLOSE):  # nothing from here on is counted
                if self.cuda:  # let the window's kernels finish
                    torch.cuda.synchronize()
            self.prof.stop()
            self.profiling = False


def _mark_closure(optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    closure = kwargs.get("closure")
    if closure is None:
        return None

    def marked() -> Any:
        with record_function(CLOSURE):
            return closure()

    return args, {**kwargs, "closure": marked}


@dataclass
class Event:
    """What the counts need of one profiler event (``parent``: the innermost CPU event enclosing it on its
    thread)."""

    name: str
    kind: str | None  # kineto's category ("cpu_op", "kernel", "gpu_memcpy", ...) where torch exposes it
    on_cpu: bool
    thread: int
    start: int
    end: int
    parent: Event | None = None


def events_of(prof: profile) -> list[Event]:
    """The profiled window's events, read from the raw kineto results: ``prof.events()`` builds a
    ``FunctionEvent`` per event and took 30 s for the 220k events of 50 steps on CPU. Parents are rebuilt per
    thread from the intervals, as ``prof.events()`` does."""
    from torch.autograd import DeviceType

    hidden = {"profiler::_record_function_enter", "profiler::_record_function_enter_new"}
    hidden |= {"profiler::_record_function_exit", "aten::is_leaf", "aten::output_nr", "aten::_version"}
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    out: list[Event] = []
    if results is None:  # an older or newer profiler: the slow, public path
        for f in prof.events():
            cpu = f.device_type == DeviceType.CPU
            start, end = int(f.time_range.start * 1e3), int(f.time_range.end * 1e3)
            out.append(
                Event(
                    f.name, getattr(f, "activity_type", None), cpu, -1 if f.is_async else f.thread, start, end
                )
            )
    for k in results.events() if results is not None else ():
        name = k.name()
        if name in hidden or name.startswith("[memory]") or getattr(k, "is_hidden_event", lambda: False)():
            continue
        start = k.start_ns()
        end = k.end_ns() if hasattr(k, "end_ns") else start + k.duration_ns()
        kind = k.activity_type() if hasattr(k, "activity_type") else None
        on_cpu = k.device_type() == DeviceType.CPU
        thread = k.start_thread_id() if on_cpu and k.start_thread_id() == k.end_thread_id() else -1
        out.append(Event(name, kind, on_cpu, thread, start, end))
    by_thread: dict[int, list[Event]] = {}
    for e in out:
        if e.on_cpu and e.thread != -1:  # async events (start and end on different threads) have no parent
            by_thread.setdefault(e.thread, []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.start, -e.end))
        stack: list[Event] = []
        for e in evs:
            while stack and stack[-1].end <= e.start:
                stack.pop()
            if stack and stack[-1].end >= e.end:
                e.parent = stack[-1]
            stack.append(e)
    return out


def _ancestors(event: Event) -> Iterator[Event]:
    parent = event.parent
    while parent is not None:
        yield parent
        parent = parent.parent


def _site(event: Event) -> str:
    """The nearest Python frame of an event outside torch's own files (needs ``with_stack``)."""
    for parent in _ancestors(event):
        m = PYTHON_FRAME.match(parent.name)
        if m and "/torch/" not in "/" + m["file"]:
            return f"{m['file']}:{m['line']} {m['func']}"
    return "?"


def _optimizer_internal(event: Event) -> bool:
    """Inside ``optimizer.step`` but outside the training closure: the optimizer's own work."""
    for parent in _ancestors(event):
        if parent.name == CLOSURE:
            return False
        if parent.name.startswith("Optimizer.step#"):
            return True
    return False


def analyse(events: Sequence[Event], steps: int, sites: int = 0) -> dict[str, Any]:
    """Per-step counts of a profiled window's events (see the module docstring for what each counts).
    Events that start at or after the window's closing mark are left out."""
    close = min((e.start for e in events if e.name == CLOSE), default=None)
    n: Counter[str] = Counter()
    where: Counter[str] = Counter()
    runtime: Counter[str] = Counter()  # CUDA runtime/driver calls and device events by name, for the JSON
    for e in events:
        name, kind = e.name, e.kind
        if close is not None and e.start >= close:
            continue
        if not e.on_cpu:  # executed on the device: kernels, copies (and sync markers)
            runtime[f"device: {name[:80]}"] += 1
            if kind == "gpu_memcpy" or (kind is None and name.startswith("Memcpy")):
                n["dtoh"] += "DtoH" in name or "Device -> P" in name
            elif kind == "kernel" or (
                kind is None and not name.startswith(("Memset", "Memcpy")) and "Sync" not in name
            ):
                n["kernels"] += 1
            continue
        if name.startswith("cu"):
            runtime[name] += 1
        if name in SYNC_OPS:
            if _optimizer_internal(e):
                n["optimizer_host_reads"] += 1
            else:
                n[name] += 1
                if sites:
                    where[f"{name.removeprefix('aten::')} @ {_site(e)}"] += 1
        if name.startswith("aten::") and not (e.parent is not None and e.parent.name.startswith("aten::")):
            n["aten_ops"] += 1
        if name.startswith(LAUNCH_CALLS):
            n["launches"] += 1
        elif name.startswith(SYNC_CALLS):
            n["cuda_syncs"] += 1
    per = {k: v / steps for k, v in n.items()}
    out = {
        "sync": per.get(SYNC_OPS[0], 0.0) + per.get(SYNC_OPS[1], 0.0),
        "local_scalar_dense": per.get(SYNC_OPS[0], 0.0),
        "nonzero": per.get(SYNC_OPS[1], 0.0),
        "aten_ops": per.get("aten_ops", 0.0),
        "optimizer_host_reads": per.get("optimizer_host_reads", 0.0),
        "launches": per.get("launches", 0.0),
        "cuda_syncs": per.get("cuda_syncs", 0.0),
        "dtoh": per.get("dtoh", 0.0),
        "kernels": per.get("kernels", 0.0),
    }
    if runtime:
        out["cuda_events"] = {k: v / steps for k, v in runtime.most_common(40)}
    if sites:
        out["sites"] = {k: v / steps for k, v in where.most_common(sites)}
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's banners, warnings and progress bar out of the way (the bar still runs, into /dev/null)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with open(os.devnull, "w") as sink, warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def measure(
    method: str | Callable[[Workload], L.LightningModule],
    tasks: int = TASKS,
    *,
    device: str = "cpu",
    steps: int = LOG_EVERY,
    warmup: int = 12,
    mode: str | None = None,
    train_metrics: bool | None = None,
    widths: Sequence[int] = WIDTHS,
    batch: int = BATCH,
    log_every_n_steps: int = LOG_EVERY,
    timed: bool = True,
    sites: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """One row: fit ``method`` (``"plain"``, ``"floor"``, a balancer name, or a factory of a LightningModule)
    for ``warmup`` + ``steps`` (timed, if ``timed``) + ``steps`` (profiled) steps; per-step figures.

    Example:
        >>> r = measure("plain", tasks=2, steps=2, warmup=1, widths=(4, 8), batch=4, log_every_n_steps=2)
        >>> r["sync"] >= 0.5, r["aten_ops"] > 10, r["ms"] > 0   # one prog-bar .item() a step, at least
        (True, True, True)
    """
    w = Workload(tasks, tuple(widths), batch)
    torch.manual_seed(seed)
    module = method(w) if callable(method) else build_module(method, w, mode, train_metrics)
    cuda = device == "cuda"
    windows = Windows(warmup, steps, timed, cuda, with_stack=sites > 0)
    total = windows.end + 1  # the step that closes the profiled window runs, then the fit stops
    loader = torch.utils.data.DataLoader(w.batches(total, seed), batch_size=None)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp, quiet():
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            max_steps=total,
            max_epochs=1,
            logger=CSVLogger(tmp),
            enable_checkpointing=False,
            log_every_n_steps=log_every_n_steps,
            callbacks=[windows],
        )
        try:
            trainer.fit(module, loader)
        finally:
            if windows.prof is not None and windows.profiling:  # a failed fit: free the profiler for the next
                windows.prof.stop()
    if windows.prof is None or windows.count <= windows.end:
        raise RuntimeError(f"the fit stopped after {windows.count} of {total} steps")
    result = analyse(events_of(windows.prof), steps, sites)
    if timed:
        marks = windows.marks
        times = [(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
        result["ms"] = (marks[-1] - marks[0]) * 1e3 / steps if cuda else statistics.median(times)
        result["times_ms"] = times
    else:
        result["ms"] = None
    return result


def measure_safely(
    method: str | Callable[[Workload], L.LightningModule], tasks: int, **kwargs: Any
) -> dict[str, Any]:
    try:
        return {"ok": True, **measure(method, tasks, **kwargs)}
    except Exception as err:  # reported as "failed: <reason>" in its row
        return {"ok": False, "error": f"{type(err).__name__}: {err}".replace("\n", " ")[:300]}


# --- planning and reporting --------------------------------------------------------------------------
def plan(patterns: Sequence[str], modes: Sequence[str] | None) -> list[dict[str, Any]]:
    """``plain``, ``floor``, then every registered balancer matching a pattern: loss weighting first, then
    the gradient methods in their default mode (or in each of ``modes`` they support)."""
    from lightning_mtl.balancing import create_balancer, list_balancers

    rows = [{"method": m, "mode": "", "family": "ref"} for m in ("plain", "floor")]
    ours = []
    for name in list_balancers():
        if name.startswith("doc_") or not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        balancer = create_balancer(name)
        if balancer.family != "gradient":
            ours.append({"method": name, "mode": "", "family": balancer.family})
            continue
        supported = ("params", "features") if getattr(balancer, "supports_features", True) else ("params",)
        for mode in [m for m in modes if m in supported] if modes else [None]:
            shown = mode or f"{getattr(balancer, 'mode', '')} (default)"
            ours.append({"method": name, "mode": shown, "family": "gradient", "set_mode": mode})
    ours.sort(key=lambda r: r["family"] == "gradient")
    return rows + ours


def _fmt(value: float | None, suffix: str = "", digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def targets(row: dict[str, Any], plain: dict[str, Any]) -> dict[str, bool]:
    """Which targets apply to one row, and whether it meets them."""
    res, out = row["result"], {}
    if not (res.get("ok") and plain.get("ok")):
        return out
    if row["family"] == "loss":
        out[f"sync <= plain + {LOSS_SYNC_SLACK}"] = res["sync"] <= plain["sync"] + LOSS_SYNC_SLACK
    elif row["family"] == "gradient":
        out[f"sync <= plain + {GRADIENT_SYNC_SLACK}"] = res["sync"] <= plain["sync"] + GRADIENT_SYNC_SLACK
    if row["method"] == "static":
        out[f"aten <= {STATIC_ATEN_RATIO}x plain"] = res["aten_ops"] <= STATIC_ATEN_RATIO * plain["aten_ops"]
    return out


def report(rows: list[dict[str, Any]], cuda: bool) -> tuple[str, dict[str, dict[str, bool]]]:
    """The markdown table of one T, and ``{target: {row: met}}``."""
    plain = next((r["result"] for r in rows if r["method"] == "plain"), {})
    head = [
        "method",
        "mode",
        "sync/step",
        "of which nonzero",
        "aten ops/step",
        "x plain",
        "ms/step",
        "x plain",
    ]
    if cuda:
        head += ["launches/step", "cuda syncs/step", "DtoH/step", "kernels/step"]
    lines = ["| " + " | ".join([*head, "targets"]) + " |", "|" + "---|" * (len(head) + 1)]
    checks: dict[str, dict[str, bool]] = {}
    for row in rows:
        res, cells = row["result"], [row["method"], row["mode"]]
        if not res.get("ok"):
            lines.append(
                "| " + " | ".join([*cells, f"failed: {res['error']}", *[""] * (len(head) - 2)]) + " |"
            )
            continue

        def ratio(key: str, res: dict[str, Any] = res) -> str:
            base = plain.get(key) if plain.get("ok") else None
            return _fmt(res[key] / base, "x", 2) if base and res.get(key) is not None else "—"

        cells += [_fmt(res["sync"]), _fmt(res["nonzero"]), _fmt(res["aten_ops"]), ratio("aten_ops")]
        cells += [_fmt(res["ms"], digits=2), ratio("ms")]
        if cuda:
            cells += [_fmt(res[k]) for k in ("launches", "cuda_syncs", "dtoh", "kernels")]
        met = targets(row, plain)
        for name, ok in met.items():
            checks.setdefault(name, {})[f"{row['method']}" + (f" [{row['mode']}]" if row["mode"] else "")] = (
                ok
            )
        missed = [name for name, ok in met.items() if not ok]
        cells.append(("✗ " + ", ".join(missed)) if missed else ("✓" if met else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[TASKS])
    parser.add_argument(
        "--methods", nargs="+", default=["*"], help="fnmatch patterns (plain and floor always run)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["params", "features"], help="gradient methods in these modes"
    )
    parser.add_argument("--train-metrics", choices=["on", "off"], help="default: the module's default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--steps", type=int, default=LOG_EVERY, help="steps per window (default log_every_n_steps)"
    )
    parser.add_argument("--warmup", type=int, default=12)  # past the 10 batches check_inputs reads
    parser.add_argument("--log-every-n-steps", type=int, default=LOG_EVERY)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="MLP widths, input first")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed window (counts only)")
    parser.add_argument("--sites", type=int, default=0, metavar="N", help="list the N top sync sites per row")
    parser.add_argument("--json", metavar="PATH", help="save the raw results")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = None if args.train_metrics is None else args.train_metrics == "on"
    import lightning

    versions = {"torch": str(torch.__version__), "lightning": lightning.__version__}
    if args.device == "cuda":
        versions["gpu"] = torch.cuda.get_device_name()
    print(
        f"# Step overhead: MLP {'-'.join(map(str, args.widths))}, batch {args.batch}, {CLASSES} classes per task, "
        f"device {args.device}, train metrics {args.train_metrics or 'default'}, {args.warmup} warm-up + "
        f"{args.steps} timed + {args.steps} profiled steps, log_every_n_steps {args.log_every_n_steps}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + "\n",
        flush=True,
    )
    out: list[dict[str, Any]] = []
    checks: dict[str, dict[str, bool]] = {}

    def save() -> None:  # after every row, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "versions": versions, "rows": out}, f, indent=1)

    for tasks in args.tasks:
        rows = []
        for row in plan(args.methods, args.modes):
            result = measure_safely(
                row["method"],
                tasks,
                device=args.device,
                steps=args.steps,
                warmup=args.warmup,
                mode=row.get("set_mode"),
                train_metrics=metrics,
                widths=args.widths,
                batch=args.batch,
                log_every_n_steps=args.log_every_n_steps,
                timed=not args.no_timing,
                sites=args.sites,
            )
            rows.append({**row, "T": tasks, "result": result})
            out.append(rows[-1])
            save()
            shown = (
                result["error"]
                if not result["ok"]
                else f"sync {result['sync']:.1f}, aten {result['aten_ops']:.0f}"
            )
            if result["ok"] and result["ms"] is not None:
                shown += f", {result['ms']:.2f} ms"
            if result["ok"] and args.device == "cuda":
                shown += ", " + ", ".join(
                    f"{k} {result[k]:.1f}" for k in ("launches", "cuda_syncs", "dtoh", "kernels")
                )
            print(f"[T={tasks}] {row['method']} {row['mode']}: {shown}", file=sys.stderr, flush=True)
        table, found = report(rows, args.device == "cuda")
        for name, met in found.items():
            checks.setdefault(name, {}).update({f"T={tasks} {k}": v for k, v in met.items()})
        print(f"## T = {tasks}\n\n{table}\n", flush=True)
        if args.sites:
            for row in rows:
                for site, count in row["result"].get("sites", {}).items():
                    print(f"- {row['method']} {row['mode']}: {count:.2f}/step {site}")
            print()
    print("## Targets\n")
    for name, met in checks.items():
        missed = [row for row, ok in met.items() if not ok]
        print(
            f"- {name}: met by {len(met) - len(missed)}/{len(met)} rows"
            + (f"; missed: {', '.join(missed)}" if missed else "")
        )
    return out


if __name__ == "__main__":
    main()
