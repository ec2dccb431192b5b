"""Helpers for the serving tests: one tiny trained run per test process, and uvicorn in a background thread."""
from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

_RUN: Path | None = None
_LOCK = threading.Lock()


def tiny_run() -> Path:
    """A step1-nano run trained for 30 steps on a slice of the stdlib corpus (~15 s once per process)."""
    global _RUN
    with _LOCK:
        if _RUN is None:
            from steplab.config import resolve
            from steplab.data.prepare import prepare_data
            from steplab.train.trainer import train

            import torch

            tmp = Path(tempfile.mkdtemp(prefix="steplab-serve-test-"))
            atexit.register(shutil.rmtree, tmp, True)
            prepare_data("stdlib", tmp / "data", vocab_size=512, max_bytes=300_000, progress=False)
            # One thread: a tiny model gains nothing from two, and on a busy 2-core machine spinning OpenMP
            # threads can make it many times slower. The process-wide setting is restored afterwards.
            threads = torch.get_num_threads()
            cfg = resolve("step1-nano", overrides=[f"data.path={tmp / 'data'}", "train.max_steps=30", "model.max_seq_len=256",
                                                   "data.seq_len=128", "train.eval_every=30", "train.ckpt_every=30",
                                                   "train.threads=1"])
            try:
                train(cfg, tmp / "run", progress=False)
            finally:
                torch.set_num_threads(threads)
            _RUN = tmp / "run"
        return _RUN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``with Server(app) as srv: srv.url`` runs uvicorn on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", proxy_headers=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class Hold:
    """Hold an engine's thread before its next step (once ``engine.steps_total >= after_steps``) until released.

    ``with Hold(engine) as hold: ...`` makes timing-dependent tests deterministic: while held, admitted requests
    stay prefilling/running and the rest stay waiting, however fast the model is or whatever it would sample.
    """

    def __init__(self, engine, after_steps: int | None = None):
        self.engine = engine
        self.after = engine.steps_total if after_steps is None else after_steps
        self.reached = threading.Event()  # the engine thread is parked in the hook
        self.go = threading.Event()

    def _hook(self) -> None:
        if self.engine.steps_total >= self.after and not self.go.is_set():
            self.reached.set()
            self.go.wait()

    def wait_reached(self, timeout: float = 30.0) -> None:
        if not self.reached.wait(timeout):
            raise AssertionError("the engine never reached the held step")

    def release(self) -> None:
        self.go.set()

    def __enter__(self) -> "Hold":
        self.engine.before_step = self._hook
        return self

    def __exit__(self, *exc) -> None:
        self.go.set()
        self.engine.before_step = None


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    """Poll ``condition()`` until it returns something truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Reference generations in this thread: one OpenMP thread (two spin badly on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    """(run dir, model, tokenizer) of the shared tiny run."""
    from steplab.train.checkpoint import load_run

    run = tiny_run()
    _, model, tokenizer, _ = load_run(run)
    return run, model, tokenizer
