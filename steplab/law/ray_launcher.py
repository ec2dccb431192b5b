"""Run sweep points as Ray tasks: the same worker function and the same resumable runs table as the local pool.

Each run is one Ray task with resource annotations (``num_cpus`` = torch threads per run, ``num_gpus`` per
run), so a Ray cluster packs runs onto its machines by what they need. The run directories must be on storage
every Ray node sees (the sweep's output directory); results come back to the driver, which alone writes the
runs table. Without ``address`` a local Ray instance is started (and stopped at the end).
"""
from __future__ import annotations

from typing import Any, Callable

from steplab.errors import ConfigError


def run_with_ray(tasks: list[tuple[Any, dict, str]], worker: Callable[[dict, str, int], dict], record: Callable[[Any, dict], None],
                 *, threads: int, gpus_per_run: float = 0.0, address: str | None = None) -> None:
    """``tasks`` = [(key, config dict, run dir)]; ``record(key, worker_result)`` is called as each finishes."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--launcher ray needs Ray: pip install 'ray>=2.9'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=threads, num_gpus=gpus_per_run, max_retries=0)(worker)
        pending = {remote.remote(config, run_dir, threads): key for key, config, run_dir in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                record(pending.pop(ref), ray.get(ref))
    except BaseException:
        for ref in list(locals().get("pending", {})):
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
