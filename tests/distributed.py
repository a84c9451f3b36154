"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Used by the multi-process tests: ``run_ranks(fn, world_size, *args)`` spawns ``world_size``
processes, initialises a gloo process group over a file store in a temporary directory, calls
``fn(rank, world_size, *args)`` and returns the list of results (rank order). A rank that raises
fails the test with its traceback; a run that exceeds ``timeout`` seconds is killed and fails the
test, so a hang never stalls the suite.
"""
from __future__ import annotations

import datetime
import gc
import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    result_path = os.path.join(store_dir, f"result{rank}.pt")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(store_dir, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
    finally:
        gc.collect()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results."""
    with tempfile.TemporaryDirectory() as store_dir:
        context = mp.start_processes(_entry, args=(world_size, store_dir, fn, args), nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not all(not process.is_alive() for process in context.processes):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s (hang?)")
            time.sleep(0.05)
        results = []
        for rank in range(world_size):
            path = os.path.join(store_dir, f"result{rank}.pt")
            if not os.path.exists(path):
                codes = [process.exitcode for process in context.processes]
                raise RuntimeError(f"rank {rank} died without a result (exit codes {codes})")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{record['error']}")
            results.append(record["result"])
        return results
