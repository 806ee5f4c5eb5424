"""Operations and host synchronisations of one gradient-aggregation call, per method and number of tasks.

On a GPU the aggregation of a ``T x T`` Gram matrix is launch-bound: every small kernel costs ~3-5 us to
launch and every device->host read stalls the step until the device has caught up. This script counts,
with ``torch.profiler`` on CPU, what one call issues: ``weights_from_gram`` for the linear methods,
``aggregate`` for GradDrop and DB-MTL (a ``T x P`` Jacobian), every task present (the mask passed, as
the training step passes it) or the last ``--absent`` tasks absent (zero rows):

* ``ops``: top-level aten operations (those not called by another aten operation), a proxy for kernel
  launches (a composite such as ``linalg_solve_triangular`` counts once);
* ``syncs``: ``aten::_local_scalar_dense`` (``.item()``, ``bool()`` / ``float()`` of a tensor, a solver's
  error check) and ``aten::nonzero`` (boolean-mask indexing) at any depth: host synchronisations on CUDA.

One warm-up call precedes the profiled one (stateful methods then start from a warm state, as in
training). Counts are deterministic for a given torch version.

Commands::

    python benchmarks/solver_ops.py                                   # every gradient method, T = 2 8 32
    python benchmarks/solver_ops.py --tasks 8 --methods 'mgda*' pcgrad
    python benchmarks/solver_ops.py --absent 1 --json ops.json        # the last task absent
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_mtl import Task
from lightning_mtl.balancing import create_balancer, list_balancers
from lightning_mtl.balancing.base import BALANCER_REGISTRY
from lightning_mtl.balancing.gradient import GradientBalancer

SYNCS = ("aten::_local_scalar_dense", "aten::nonzero")


def count_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """``{"ops": top-level aten operations, "syncs": host synchronisations}`` of one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    top = [
        e
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    return {"ops": len(top), "syncs": sum(e.name in SYNCS for e in events)}


def gradient_methods(patterns: Sequence[str] = ("*",)) -> list[str]:
    """The registered gradient-aggregation methods whose name matches one of ``patterns`` (fnmatch)."""
    return [
        name
        for name in list_balancers()
        if BALANCER_REGISTRY.get(name).family == "gradient"
        and not name.startswith("doc_")
        and any(fnmatch.fnmatch(name, p) for p in patterns)
    ]


def one_call(name: str, tasks: int, absent: int = 0, params: int = 64, seed: int = 0) -> Callable[[], Any]:
    """The call to count: method ``name`` set up for ``tasks`` tasks, on a seeded random Jacobian whose last
    ``absent`` rows are zero (those tasks absent)."""
    balancer = create_balancer(name)
    assert isinstance(balancer, GradientBalancer)
    balancer.setup([Task(f"t{i}", kind="regression") for i in range(tasks)])
    present = torch.arange(tasks) < tasks - absent
    jac = torch.randn(tasks, params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jac = jac * present[:, None]
    if balancer.linear:
        gram = jac @ jac.T
        return lambda: balancer.weights_from_gram(gram, present)
    return lambda: balancer.aggregate(jac, present)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32], help="numbers of tasks T")
    parser.add_argument("--methods", nargs="+", default=["*"], help="fnmatch patterns of method names")
    parser.add_argument("--absent", type=int, default=0, help="how many tasks (the last) are absent")
    parser.add_argument("--params", type=int, default=64, help="Jacobian columns (GradDrop, DB-MTL)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for name in gradient_methods(args.methods):
        for tasks in args.tasks:
            fn = one_call(name, tasks, min(args.absent, tasks - 1), args.params)
            fn()  # warm-up: lazy initialisation, a warm state for the stateful methods
            rows.append({"method": name, "tasks": tasks, **count_ops(fn)})

    print("| method | " + " | ".join(f"T={t} ops (syncs)" for t in args.tasks) + " |")
    print("|---|" + "---:|" * len(args.tasks))
    for name in gradient_methods(args.methods):
        cells = {r["tasks"]: f"{r['ops']} ({r['syncs']})" for r in rows if r["method"] == name}
        print(f"| {name} | " + " | ".join(cells[t] for t in args.tasks) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
