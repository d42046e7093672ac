"""A bounded job queue served by one worker thread.

Jobs run one at a time on the worker (the loaded pipeline is not shared between threads). A job
is stopped by a flag that its progress callback checks (``Job.check_stop`` raises ``Stopped``), so
stopping never interrupts a tensor operation half-way. The worker survives every ``Exception``
a job raises (out-of-memory included), records it on the job, and serves the next one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable

import numpy as np
import torch

from ..errors import NonFiniteOutputError, ParamError, SfumatoError
from .security import A1111_FIELDS, ApiError

log = logging.getLogger(__name__)

FINISHED = ("done", "interrupted", "failed", "cancelled")
STOP_REASONS = ("cancel", "interrupt", "skip")


class Stopped(Exception):
    """Raised inside a running job when it is asked to stop: ``reason`` is ``cancel`` (the job
    API: no result), ``interrupt`` (A1111: end now, keep what is done) or ``skip`` (A1111: end the
    current iteration, go on with the next)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class QueueFull(Exception):
    pass


class Job:
    """One unit of work and its observable state (read by HTTP handlers, written by the worker)."""

    def __init__(self, task: Callable[["Job"], Any], *, kind: str, origin: str, n_iter: int = 1):
        self.id = uuid.uuid4().hex
        self.task, self.kind, self.origin = task, kind, origin
        self.status = "queued"
        self.created, self.started, self.finished = time.time(), None, None
        self.result: Any = None
        self.error: ApiError | None = None
        self.iteration, self.n_iter = 0, n_iter
        self.stage, self.step, self.steps = "", 0, 0
        self.preview: np.ndarray | None = None
        self.version = 0
        self._stop: str | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def stopping(self) -> str | None:
        return self._stop

    def update(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, value)
            self.version += 1

    def begin_iteration(self, index: int) -> None:
        """A new iteration starts: a skip requested for the previous one is spent."""
        with self._lock:
            if self._stop == "skip":
                self._stop = None
            self.iteration, self.step, self.preview = index, 0, None
            self.version += 1

    def request_stop(self, reason: str) -> bool:
        """Ask the job to stop; False if it has already finished. ``cancel`` is never downgraded."""
        assert reason in STOP_REASONS
        with self._lock:
            if self.done:
                return False
            if self._stop != "cancel":
                self._stop = reason
            self.version += 1
            return True

    def check_stop(self) -> None:
        """Called by the worker between steps: raises ``Stopped`` if a stop was requested."""
        with self._lock:
            reason = self._stop
            if reason == "skip":
                self._stop = None
        if reason is not None:
            raise Stopped(reason)

    def progress(self) -> float:
        """Fraction done in [0, 1], counting iterations and steps as A1111 does."""
        if self.status != "running":
            return 1.0 if self.done else 0.0
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.iteration + within) / max(1, self.n_iter))

    def eta(self) -> float:
        """Estimated seconds left (0 when unknown)."""
        fraction = self.progress()
        if self.status != "running" or self.started is None or fraction <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / fraction - elapsed)

    def on_done(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (on any thread) once the job has finished; at once if it has."""
        with self._lock:
            if not self.done:
                self._callbacks.append(callback)
                return
        callback()

    def finish(self, status: str, result: Any = None, error: ApiError | None = None) -> None:
        with self._lock:
            if self.done:
                return
            self.status, self.result, self.error = status, result, error
            self.finished = time.time()
            self.preview = None
            self.version += 1
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class JobQueue:
    """At most ``max_queue`` jobs waiting, one running; finished jobs are kept (the last ``keep``)
    until their results are fetched or they age out."""

    def __init__(self, max_queue: int, keep: int = 64):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue, self.keep = max_queue, keep
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running: Job | None = None

    def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="sfumato-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is queued and running, and wait for the worker to end."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            running = self.running
            self._cond.notify_all()
        for job in pending:
            job.finish("cancelled", error=ApiError(503, "the server is shutting down"))
        if running is not None:
            running.request_stop("cancel")
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
            self._pending.append(job)
            self._jobs[job.id] = job
            self._trim()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def forget(self, job: Job) -> None:
        with self._cond:
            self._jobs.pop(job.id, None)

    def position(self, job: Job) -> int | None:
        """0-based place in the queue of a waiting job; None when it is not waiting."""
        with self._cond:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def cancel(self, job: Job) -> bool:
        """Cancel one job: a waiting one leaves the queue, a running one stops at its next step."""
        with self._cond:
            waiting = job in self._pending
            if waiting:
                self._pending.remove(job)
        if waiting:
            job.finish("cancelled")
            return True
        return job.request_stop("cancel")

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.done]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._pending.popleft()
                self.running = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                    self._trim()

    def _run(self, job: Job) -> None:
        job.update(status="running", started=time.time())
        try:
            job.check_stop()            # cancelled between leaving the queue and starting
            result = job.task(job)
        except Stopped as e:
            job.finish("cancelled" if e.reason == "cancel" else "interrupted")
        except Exception as e:  # noqa: BLE001 — the worker must survive any job
            job.finish("failed", error=_error_of(e))
            if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        else:
            job.finish("interrupted" if job.stopping == "interrupt" else "done", result)


def _error_of(e: Exception) -> ApiError:
    """A job's exception as the error its client receives. Messages of unexpected errors stay in
    the log (they may name files); the client learns the error's type."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ParamError):
        log.info("job refused: %s", e)
        return ApiError(422, e.public.split(": ", 1)[-1], A1111_FIELDS.get(e.field, e.field))
    if isinstance(e, NonFiniteOutputError):
        log.warning("job failed: %s", e)
        return ApiError(422, e.public, "sd_model_checkpoint", error="non_finite_output")
    if isinstance(e, SfumatoError):
        log.warning("job failed: %s", e)
        return ApiError(422, e.public)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        log.error("job ran out of memory: %s", e)
        return ApiError(507, "out of memory: try a smaller size or batch", error="out_of_memory")
    log.exception("job failed")
    return ApiError(500, f"the job failed ({type(e).__name__}); see the server log")


async def wait(job: Job, request: Any = None, on_disconnect: Callable[[], Any] | None = None) -> Job:
    """Await a job's end from the event loop without holding a thread. With ``request`` (a Starlette
    request whose body has been read), a client that hangs up first triggers ``on_disconnect``
    (cancelling its job), and the job's end is still awaited."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
        except RuntimeError:      # the loop has closed: nobody is waiting any more
            pass

    job.on_done(wake)
    if request is None:
        await future
        return job
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done and not future.done():
            log.info("client disconnected: cancelling job %s", job.id)
            if on_disconnect is not None:
                on_disconnect()
            await future
    finally:
        watcher.cancel()
    return job


async def _disconnected(request: Any) -> None:
    """Returns once the client has hung up (the request's body has already been read)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return
