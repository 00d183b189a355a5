"""Run a function on a few gloo ranks (CPU processes) and collect what each returns: for the tests of
syncs across ranks outside ``test_distributed.py``; and count the collectives a call makes."""

from __future__ import annotations

import datetime
import multiprocessing
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TIMEOUT_S = 90  # a hang fails the test instead of blocking the run


def _worker(rank: int, world: int, port: int, outdir: str, target) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        try:
            out = target(rank, world)
        finally:
            dist.destroy_process_group()
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(world: int, target, outdir: Path, preload: str) -> list:
    """``target(rank, world)`` on ``world`` ranks of a gloo group; the list of their results.

    ``target`` must be a module-level function of module ``preload`` (imported once by the forkserver, so
    that each rank starts in milliseconds). Raises ``AssertionError`` with the ranks' tracebacks when a rank
    fails or does not finish in ``TIMEOUT_S``.
    """
    store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mono_quant", __name__, preload])
    procs = [
        ctx.Process(target=_worker, args=(r, world, store.port, str(outdir), target), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(outdir.glob("*.err")))
    assert not hung, f"ranks {hung} of {world} did not finish in {TIMEOUT_S} s\n{errors}"
    assert all(p.exitcode == 0 for p in procs), f"ranks exited with {[p.exitcode for p in procs]}\n{errors}"
    return [torch.load(outdir / f"rank{r}.pt") for r in range(world)]


def count_all_reduce(fn) -> int:
    """How many ``dist.all_reduce`` calls ``fn()`` makes (on a rank of an initialized group)."""
    calls, original = [], dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = original
    return len(calls)
