"""How many sweep workers and torch threads this machine can use: its CPU affinity and its idle cores."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads(workers: int = 1) -> int:
    """Torch threads per worker: the cores divided among the workers, but no more than the cores other
    processes leave idle (1-minute load average). On a shared 2-core machine a second intra-op thread that
    has to wait for a busy core makes small-model steps 2-5x *slower* (measured: d_model 64, batch 16x256,
    bf16: 1 thread 10-15k tok/s, 2 threads 2-5k tok/s while another process kept one core busy)."""
    cores = usable_cores()
    share = max(1, cores // max(1, workers))
    try:
        idle = cores - int(round(os.getloadavg()[0]))
    except OSError:
        idle = cores
    return max(1, min(share, idle))


def auto_workers(n_runs: int) -> int:
    """One worker per usable core (tiny models gain little from a second thread: a core per run keeps every
    core busy), never more workers than runs."""
    return max(1, min(usable_cores(), n_runs))
