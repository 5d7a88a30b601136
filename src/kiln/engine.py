"""The serving engine: a Scheduler driven on its own thread, with admission control and per-request text streams.

Requests arrive from the server's event loop (submit), become scheduler Requests (n of them for n choices: the
later ones are admitted once the first has prefilled the prompt, so they share its full blocks through the prefix
cache), and every step's tokens go through each choice's TextStream (detokenizing, stop strings) back to the loop.
A client that goes away (Job.cancel) has its sequences freed at the next step boundary.

Pass `loader` (a function returning a Model) rather than `model` for GPU backends: the model is then loaded, used
and closed on the engine thread alone, because device state (CUDA's current device, Metal's autorelease pools) is
per thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from .errors import KilnError
from .generate import TextStream
from .sample import make_logits_processors, make_sampler
from .scheduler import Request, Scheduler
from .server_wire import ApiError, GenRequest

log = logging.getLogger("kiln.server")

END = object()  # the last item of a Job's queue


class Metrics:
    """Counters for /metrics in Prometheus' text format; plain ints under a lock (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0
        self.rejected = 0
        self.tokens_per_second = 0.0
        self.started = time.time()

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def render(self, queue_depth: int, active: int) -> str:
        with self.lock:
            lines = [
                "# HELP kiln_requests_total HTTP requests by endpoint and status code.",
                "# TYPE kiln_requests_total counter",
            ]
            for (ep, status), n in sorted(self.requests.items()):
                lines.append(f'kiln_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            for name, kind, value, text in (
                ("kiln_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens of started generations."),
                ("kiln_generation_tokens_total", "counter", self.generation_tokens, "Tokens generated."),
                ("kiln_cancelled_requests_total", "counter", self.cancelled, "Generations stopped by a disconnect."),
                ("kiln_rejected_requests_total", "counter", self.rejected, "Requests refused: queue full (429)."),
                (
                    "kiln_generation_tokens_per_second",
                    "gauge",
                    round(self.tokens_per_second, 3),
                    "Tokens per second of the latest engine step.",
                ),
                ("kiln_queue_depth", "gauge", queue_depth, "Requests waiting for the model."),
                ("kiln_active_requests", "gauge", active, "Requests generating now (batched)."),
                ("kiln_uptime_seconds", "gauge", round(time.time() - self.started, 1), "Seconds since start."),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class Job:
    """One admitted HTTP request. The engine pushes (choice index, Chunk) items, then END or an exception, into
    `out` on the event loop."""

    def __init__(self, engine: Engine, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.engine, self.req, self.loop = engine, req, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.choices: list[tuple[Request, TextStream]] = []
        self._released = False

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        """Client gone: its sequences stop at the next step; the admission slot is given back now."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.engine.release(self, cancelled=True)
            self.engine.wake()

    def finish(self) -> None:
        self.engine.release(self, cancelled=False)


class Engine:
    """Owns the model and its scheduler; --max-concurrency bounds requests queued + running."""

    def __init__(
        self,
        model=None,
        max_concurrency: int = 64,
        loader=None,
        max_seqs: int = 64,
        kv_tokens: int | None = None,
        token_budget: int = 512,
    ):
        if max_concurrency < 1:
            raise KilnError("--max-concurrency must be at least 1")
        if (model is None) == (loader is None):
            raise ValueError("give either a model or a loader")
        self.model, self._owns_model = model, loader is not None
        self.max_concurrency = max_concurrency
        self._settings = (max_seqs, kv_tokens, token_budget)
        self.metrics = Metrics()
        self.sched: Scheduler | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # queued + running, cancelled ones excluded
        self._jobs: list[Job] = []  # running on the engine thread (touched only there)
        self._ready, self._idle, self._stop = threading.Event(), threading.Event(), False
        self._idle.set()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(loader,), name="kiln-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        self.tokenizer = self.model.tokenizer

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> tuple[int, int]:
        """(requests waiting, requests running) as the scheduler last saw them."""
        s = self.sched
        return (len(s.waiting), len(s.running)) if s is not None else (0, 0)

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(self, req, loop)
        with self._lock:
            if self._admitted >= self.max_concurrency:
                self.metrics.rejected += 1
                raise ApiError(
                    429,
                    f"the server is busy ({self._admitted} requests queued or running, limit "
                    f"{self.max_concurrency}); retry later",
                    code="rate_limit_exceeded",
                    type="rate_limit_error",
                )
            self._admitted += 1
            self._idle.clear()
        self._inbox.put(job)
        return job

    def release(self, job: Job, cancelled: bool) -> None:
        with self._lock:
            if job._released:
                return
            job._released = True
            self._admitted -= 1
            if cancelled:
                self.metrics.cancelled += 1

    def wake(self) -> None:
        self._inbox.put(None)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """True once no request is queued or running (tests use it before touching the model directly)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._stop = True
        self.wake()
        self._thread.join(timeout=10)

    # --- the engine thread --------------------------------------------------------------------------------------
    def _main(self, loader) -> None:
        try:
            if loader is not None:
                self.model = loader()
            max_seqs, kv_tokens, budget = self._settings
            cache = self.model.make_cache(kv_tokens or self.model.n_ctx * min(max_seqs, 8))
            self.sched = Scheduler(self.model, cache, max_seqs=max_seqs, token_budget=budget)
        except BaseException as e:  # re-raised by __init__ on the caller's thread
            self._load_error = e
            return
        finally:
            self._ready.set()
        try:
            self._run()
        finally:
            self.sched.cache.close()
            if self._owns_model:
                self.model.close()

    def _run(self) -> None:
        sched = self.sched
        while not self._stop:
            self._take_inbox(block=not sched.busy)
            self._drop_cancelled()
            if not sched.busy:
                with self._lock:
                    if self._admitted == 0 and not self._jobs:
                        self._idle.set()
                continue
            t0 = time.perf_counter()
            try:
                events = sched.step()
            except Exception as e:  # every sequence of the step is suspect: end them all, keep serving
                if not isinstance(e, KilnError):
                    log.exception("an engine step failed")
                self._fail_all(e)
                continue
            self._deliver(events)
            if events:
                with self.metrics.lock:
                    self.metrics.tokens_per_second = len(events) / max(time.perf_counter() - t0, 1e-9)

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, Job) and not item.cancelled.is_set():
                self._start(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _start(self, job: Job) -> None:
        r = job.req
        sampler = make_sampler(r.temperature, r.top_k, r.top_p, r.min_p, r.seed) if r.temperature > 0 else None
        procs = make_logits_processors(
            repeat_penalty=r.repetition_penalty,
            presence_penalty=r.presence_penalty,
            frequency_penalty=r.frequency_penalty,
            prompt_len=len(r.prompt_ids),  # processors see prompt + output; OpenAI's penalties count the output
        )
        room = self.sched.cache.max_seq_len - len(r.prompt_ids)
        max_tokens = min(r.max_tokens or room, room)
        k = max(r.top_logprobs, 1) if r.logprobs else 0
        first = None
        try:
            for i in range(r.n):
                if i and r.temperature > 0:  # each choice draws its own numbers (seeded choices: seed + i)
                    seed = None if r.seed is None else r.seed + i
                    sampler = make_sampler(r.temperature, r.top_k, r.top_p, r.min_p, seed)
                sr = Request(
                    list(r.prompt_ids),
                    max_tokens,
                    frozenset(self.tokenizer.eos_ids),
                    sampler,
                    procs,
                    k,
                    after=first,
                )
                self.sched.add(sr)
                first = first or sr
                job.choices.append((sr, TextStream(self.tokenizer, r.stop, max_tokens, len(r.prompt_ids))))
        except KilnError as e:
            for sr, _ in job.choices:
                self.sched.cancel(sr)
            self._end(job, e)
            return
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(r.prompt_ids) * r.n
        self._jobs.append(job)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._jobs if j.cancelled.is_set()]:
            for sr, _ in job.choices:
                self.sched.cancel(sr)
            self._jobs.remove(job)
            job.put(END)

    def _deliver(self, events) -> None:
        owner = {id(sr): (job, i, text) for job in self._jobs for i, (sr, text) in enumerate(job.choices)}
        for ev in events:
            job, i, text = owner.get(id(ev.request), (None, 0, None))
            if job is None or text.done:
                continue
            if ev.token is not None:
                with self.metrics.lock:
                    self.metrics.generation_tokens += 1
                for chunk in text.feed(ev.token, ev.logprob, ev.top_logprobs):
                    job.put((i, chunk))
                if text.done and ev.request.finish is None:
                    self.sched.cancel(ev.request)  # a stop string ended the text before the scheduler did
            if ev.request.finish == "error" and not text.done:
                text.done = True
                job.put(KilnError(ev.request.error or "generation failed"))
            elif ev.request.finish is not None and not text.done:
                job.put((i, text.end(ev.request.finish)))
        for job in [j for j in self._jobs if all(text.done for _, text in j.choices)]:
            self._jobs.remove(job)
            self._end(job, None)

    def _end(self, job: Job, error: BaseException | None) -> None:
        if error is not None:
            job.put(error)
        job.finish()  # release before END reaches the handler, whose cleanup would count a cancel
        job.put(END)

    def _fail_all(self, error: Exception) -> None:
        for job in self._jobs:
            for sr, _ in job.choices:
                self.sched.cancel(sr)
            self._end(job, error if isinstance(error, KilnError) else RuntimeError("generation failed"))
        self._jobs.clear()
