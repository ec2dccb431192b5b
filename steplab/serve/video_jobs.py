"""Text-to-video jobs for ``/v1/videos``: a bounded queue, one worker thread, files on disk with a cap and an expiry.

A job belongs to the key that created it (``owner``: a hash of the key, never the key; "" when auth is off) and
is invisible to every other key. Finished clips are written atomically as ``<dir>/<job id>.gif``; ids are
server-made (``video_`` + 32 hex digits) and checked before any path is built from them. Files older than
``ttl_s`` are deleted (their jobs answer "expired"), and when a new file would push the directory over
``max_bytes`` the oldest finished files go first.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steplab.infer.video import clip_bytes

log = logging.getLogger("steplab.serve")
ID_RE = re.compile(r"video_[0-9a-f]{32}")


@dataclass
class VideoJob:
    id: str
    owner: str
    model: str
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    created_at: int
    status: str = "queued"  # queued | in_progress | completed | failed | expired
    completed_at: int | None = None
    expires_at: int | None = None
    error: str | None = None
    bytes: int = 0

    def card(self, frames: int, size: int, fps: int) -> dict[str, Any]:
        """OpenAI's video object, plus the sampler settings this server used."""
        out = {"id": self.id, "object": "video", "model": self.model, "status": self.status, "prompt": self.prompt,
               "progress": 100 if self.status == "completed" else 0, "created_at": self.created_at,
               "completed_at": self.completed_at, "expires_at": self.expires_at, "size": f"{size}x{size}",
               "seconds": f"{frames / fps:.3g}", "seed": self.seed, "steps": self.steps,
               "guidance_scale": self.guidance_scale, "error": None}
        if self.error:
            out["error"] = {"code": "generation_failed", "message": self.error}
        return out


@dataclass
class VideoService:
    """Video models by name (a loaded VideoDiT each), the job table and its worker."""

    models: dict[str, Any]  # name -> VideoDiT (eval mode)
    directory: Path
    max_bytes: int = 100_000_000
    ttl_s: int = 3600
    max_pending: int = 16
    fps: int = 8
    clock: Any = time.time
    jobs: dict[str, VideoJob] = field(default_factory=dict)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue(maxsize=self.max_pending)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="video-jobs", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
            self._thread = None

    # the API's operations
    def submit(self, owner: str, model: str, prompt: str, seed: int, steps: int, guidance_scale: float) -> VideoJob:
        """Queue a job; raises queue.Full when max_pending jobs wait already."""
        job = VideoJob(id="video_" + uuid.uuid4().hex, owner=owner, model=model, prompt=prompt, seed=seed, steps=steps,
                       guidance_scale=guidance_scale, created_at=int(self.clock()))
        with self._lock:
            self._queue.put_nowait(job)
            self.jobs[job.id] = job
        return job

    def get(self, owner: str, job_id: str) -> VideoJob | None:
        """The job if ``owner`` created it (another key's job looks exactly like a missing one)."""
        self.expire()
        job = self.jobs.get(job_id) if ID_RE.fullmatch(job_id) else None
        return job if job is not None and job.owner == owner else None

    def list(self, owner: str) -> list[VideoJob]:
        self.expire()
        return sorted((j for j in self.jobs.values() if j.owner == owner), key=lambda j: j.created_at, reverse=True)

    def delete(self, owner: str, job_id: str) -> VideoJob | None:
        job = self.get(owner, job_id)
        if job is not None:
            with self._lock:
                self._remove_file(job)
                self.jobs.pop(job.id, None)
        return job

    def path(self, job: VideoJob) -> Path:
        assert ID_RE.fullmatch(job.id)
        return self.directory / f"{job.id}.gif"

    def card(self, job: VideoJob) -> dict[str, Any]:
        v = self.models[job.model].v
        return job.card(v.frames, v.size, self.fps)

    # storage limits
    def expire(self) -> None:
        with self._lock:
            self._expire_locked()

    def _expire_locked(self) -> None:
        now = self.clock()
        for job in self.jobs.values():
            if job.status == "completed" and job.expires_at is not None and job.expires_at <= now:
                self._remove_file(job)
                job.status = "expired"

    def _remove_file(self, job: VideoJob) -> None:
        self.path(job).unlink(missing_ok=True)
        job.bytes = 0

    def _make_room(self, need: int) -> None:
        """Delete the oldest finished files until ``need`` more bytes fit under max_bytes."""
        done = sorted((j for j in self.jobs.values() if j.status == "completed"), key=lambda j: j.completed_at or 0)
        used = sum(j.bytes for j in done)
        for job in done:
            if used + need <= self.max_bytes:
                break
            used -= job.bytes
            self._remove_file(job)
            job.status = "expired"

    # the worker
    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                return
            self._process(job)

    def run_pending(self) -> int:
        """Process the queued jobs in the calling thread (tests; a server uses the worker thread)."""
        n = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return n
            if job is not None:
                self._process(job)
                n += 1

    def _process(self, job: VideoJob) -> None:
        import torch

        if job.id not in self.jobs:  # deleted while queued
            return
        job.status = "in_progress"
        try:
            model = self.models[job.model]
            with torch.inference_mode():
                clip = model.sample([job.prompt], steps=job.steps, cfg_scale=job.guidance_scale, seed=job.seed)[0]
            data = clip_bytes(clip, ".gif", fps=self.fps)
            if len(data) > self.max_bytes:
                raise RuntimeError(f"the clip ({len(data)} bytes) exceeds the server's video storage cap")
            with self._lock:
                self._expire_locked()
                self._make_room(len(data))
                tmp = self.path(job).with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(self.path(job))
                job.bytes, job.status = len(data), "completed"
                job.completed_at = int(self.clock())
                job.expires_at = job.completed_at + self.ttl_s
        except Exception:  # a failed job reports itself; the worker goes on
            log.exception("video job %s failed", job.id)
            job.status, job.error = "failed", "generation failed; the server log has the details"
