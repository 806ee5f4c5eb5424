"""Cost of the DDP agreement on skipping unlabelled batches: one CPU (gloo) all-reduce of a flag per step.

`MultiTaskModule.skip_unlabelled` makes every rank ask, once per training step, whether any rank's batch holds a
label (`lightning_mtl.module._all_ranks_any`). This measures that call in 2 CPU processes against, in the same
run, a gloo all-reduce of a 1M-float gradient bucket (what DDP reduces anyway for a ~4 MB model).

    python benchmarks/skip_flag_cost.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(fn, steps: int) -> float:
    for _ in range(20):
        fn()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def _run(rank: int, port: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from lightning_mtl.module import _all_ranks_any

    trainer = SimpleNamespace(world_size=2)
    bucket = torch.zeros(1_000_000)
    flag = _timed(lambda: _all_ranks_any(rank == 0, trainer), steps)
    grads = _timed(lambda: dist.all_reduce(bucket), max(steps // 10, 20))
    if rank == 0:
        print(f"skip flag all-reduce (2 gloo processes): {flag * 1e6:.1f} us/step")
        print(f"gradient bucket all-reduce, 1M floats:   {grads * 1e6:.1f} us/step")
        print(f"ratio flag / bucket:                     {flag / grads:.3f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    mp.spawn(_run, args=(_free_port(), args.steps), nprocs=2)


if __name__ == "__main__":
    main()
