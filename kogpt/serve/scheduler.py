"""The serving loop: one background thread owns the Engine; HTTP handlers reach it through queues.

`Scheduler.submit` (called on the event loop) admits a job of one or more sequences or raises
QueueFull at once (capacity: --max-batch-size running + --max-queue waiting). The thread drains
submissions and cancellations between Engine steps, so a new request joins the running batch at the
next step and a finished or cancelled one frees its cache row at once (kogpt.generation.engine). Each sequence
detokenizes through api.TextStream (Hangul never split, stop strings cut and held back); its pieces
reach the handler on the job's asyncio.Queue via loop.call_soon_threadsafe.

    job = scheduler.submit([SeqSpec(ids, 64, sampling)]); async for piece in job: print(piece.text)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..api import KoGPT, TextStream
from ..errors import UserError
from ..generation.engine import Engine, Event, Request
from ..generation.sampling import SamplingConfig
from ..generation.hooks import RequestHook
from .telemetry import Metrics

log = logging.getLogger("kogpt.serve")


class QueueFull(Exception):
    """Every running slot and queue place is taken; the client should retry later (HTTP 429)."""


@dataclass
class SeqSpec:
    """One sequence to generate: prompt ids, token budget, decoding settings."""

    ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # report log-probabilities, with this many top alternatives
    hooks: tuple[RequestHook, ...] = ()  # this sequence's own features: PPLM steering, its adapter
    speculate: int = 0  # speculative decoding's draft length (kogpt.generation.speculative); 0: off


@dataclass
class Piece:
    """New text of one sequence of a job, with the ids (EOS included) generated since the last piece."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish: str | None = None  # "stop", "length" or "cancelled" on a sequence's last piece
    completion_tokens: int = 0  # on the last piece: ids generated, EOS included


class Job:
    """The sequences of one HTTP request. Iterate (async) for Pieces; `cancel()` frees their slots."""

    def __init__(self, scheduler: "Scheduler", n: int, prompt_tokens: int):
        self.scheduler, self.n, self.prompt_tokens = scheduler, n, prompt_tokens
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()
        self.keys: list[int] = []
        self.submitted = time.perf_counter()
        self.first_token: float | None = None  # set by the engine thread
        self.cancelled = self.done = False

    def cancel(self) -> None:
        """Drop the job's sequences that are still queued or running (e.g. the client went away)."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self.scheduler._inbox.put(("cancel", self))

    def __aiter__(self):
        return self._pieces()

    async def _pieces(self):
        left = self.n
        while left:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish is not None:
                left -= 1
            yield item
        self.done = True

    def _put(self, item: Piece | BaseException) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class _Seq:
    """Engine-thread state of one sequence: its text stream and what it has not handed out yet."""

    def __init__(self, job: Job, index: int, spec: SeqSpec, stream: TextStream):
        self.job, self.index, self.spec, self.stream = job, index, spec, stream
        self.pending = Piece(index, "")
        self.generated = 0

    def on_event(self, ev: Event) -> Piece | None:
        if ev.token >= 0:
            self.generated += 1
            self.pending.token_ids.append(ev.token)  # EOS too: OpenAI's and vLLM's logprobs list it
            if ev.logprob is not None:
                self.pending.logprobs.append(ev.logprob)
                self.pending.top.append(ev.top)
        if ev.finish:
            self.stream.finish()
        text = self.stream.ready(done=ev.finish is not None)
        if not text and not ev.finish:
            return None
        piece, self.pending = self.pending, Piece(self.index, "")
        piece.text, piece.finish = text, ev.finish
        if ev.finish:
            piece.completion_tokens = self.generated
        return piece


class Scheduler:
    """Runs an Engine of `max_batch_size` rows in a daemon thread; see the module docstring."""

    def __init__(self, gpt: KoGPT, max_batch_size: int = 8, max_queue: int = 64, metrics: Metrics | None = None,
                 step_fn=None):
        if max_batch_size < 1 or max_queue < 0:
            raise UserError("max_batch_size must be >= 1 and max_queue >= 0")
        self.gpt, self.max_batch_size, self.max_queue = gpt, max_batch_size, max_queue
        self.metrics = metrics or Metrics()
        self.step_fn = step_fn or gpt.step_fn  # decode_step, or the KoGPT's compiled step
        self.engine = Engine(gpt.model, max_batch_size, step_fn=self.step_fn)
        self.max_len = self.engine.max_len
        self.eos = tuple(i for i in {gpt.tokenizer.eos_id} if i is not None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight = 0  # sequences queued or running
        self.running = 0  # rows decoding (engine thread writes, others read)
        self._seqs: dict[int, _Seq] = {}  # engine key -> sequence (engine thread only)
        self._keys = itertools.count()
        self._stopped = threading.Event()
        self.error: BaseException | None = None  # set if the loop itself died
        self._thread = threading.Thread(target=self._run, name="kogpt-engine", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    @property
    def waiting(self) -> int:
        """Sequences accepted but not yet in a cache row."""
        return max(0, self._inflight - self.running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, specs: Sequence[SeqSpec]) -> Job:
        """Queue a job (call on the event loop); QueueFull at once when it does not fit."""
        if len(specs) > self.capacity:
            raise UserError(f"the request asks for {len(specs)} sequences; this server takes at most {self.capacity}")
        with self._lock:
            if self._inflight + len(specs) > self.capacity:
                raise QueueFull(f"the server is busy ({self._inflight} sequences running or queued); retry later")
            self._inflight += len(specs)
        job = Job(self, len(specs), sum(len(s.ids) for s in specs))
        job.keys = [next(self._keys) for _ in specs]
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        self._inbox.put(("submit", job, list(specs)))
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; jobs still open end with an error."""
        self._stopped.set()
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain(block=self.engine.idle)
                if self.engine.idle:
                    continue
                try:
                    events = self.engine.step()
                    self.running = len(self.engine.rows)
                    self._dispatch(events)
                except Exception as e:  # a bug: fail the open jobs, start a fresh engine, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                    self.engine = Engine(self.gpt.model, self.max_batch_size, step_fn=self.step_fn)
        except BaseException as e:  # pragma: no cover - keeps /health honest if the thread dies
            self.error = e
            log.exception("scheduler thread died")
        finally:
            self._fail_all(RuntimeError("the server is shutting down"))

    def _drain(self, block: bool) -> None:
        while True:
            try:
                cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if cmd[0] == "submit":
                job = cmd[1]
                try:
                    self._start(job, cmd[2])
                except Exception as e:  # a bug: fail this job, keep serving the others
                    log.exception("could not start a request")
                    self._abort(job, e, unregistered=sum(k not in self._seqs for k in job.keys))
            elif cmd[0] == "cancel":
                self._cancel(cmd[1])

    def _start(self, job: Job, specs: list[SeqSpec]) -> None:
        device = self.gpt.model.wte.weight.device
        for i, (key, spec) in enumerate(zip(job.keys, specs)):
            stream = TextStream(self.gpt.tokenizer, spec.stop, spec.ids)  # prompt as left context
            rng = None if spec.seed is None else torch.Generator(device).manual_seed(spec.seed)
            req = Request(spec.ids, spec.max_new_tokens, spec.sampling, self.eos, rng, stream.push, key, spec.logprobs,
                          spec.hooks, spec.speculate)
            self._seqs[key] = _Seq(job, i, spec, stream)
            self.engine.submit(req)  # prompts were checked by the handler; errors fail the job (_drain)

    def _cancel(self, job: Job) -> None:
        for key in job.keys:
            seq = self._seqs.pop(key, None)
            if seq is not None:
                self.engine.cancel(key)
                self._release(1)
                job._put(Piece(seq.index, "", finish="cancelled", completion_tokens=seq.generated))
                self.metrics.cancelled.inc()
        self.running = len(self.engine.rows)

    def _dispatch(self, events: list[Event]) -> None:
        now = time.perf_counter()
        decoded = sum(ev.token >= 0 for ev in events)
        if decoded:  # a speculating row may emit several tokens in one step
            self.metrics.batch_size.observe(len({ev.key for ev in events if ev.token >= 0}))
            self.metrics.generation_tokens.inc(decoded)
        for ev in events:
            seq = self._seqs.get(ev.key)
            if seq is None:
                continue
            job = seq.job
            if ev.error is not None:  # this request's own prefill or steering failed; the batch goes on
                log.error("request failed: %s", ev.error, exc_info=ev.error)
                self._abort(job, ev.error)
                continue
            if job.first_token is None and ev.token >= 0:
                job.first_token = now
                self.metrics.ttft.observe(now - job.submitted)
            piece = seq.on_event(ev)
            if ev.finish:
                del self._seqs[ev.key]
                self._release(1)
                if not any(s.job is job for s in self._seqs.values()):
                    self.metrics.latency.observe(now - job.submitted)
            if piece is not None:
                job._put(piece)

    def _release(self, n: int) -> None:
        with self._lock:
            self._inflight -= n

    def _abort(self, job: Job, error: BaseException, unregistered: int = 0) -> None:
        """End a job with an error: drop its sequences and give their places back."""
        for key in job.keys:
            if self._seqs.pop(key, None) is not None:
                self.engine.cancel(key)
                self._release(1)
        self._release(unregistered)
        self.running = len(self.engine.rows)
        job._put(error)

    def _fail_all(self, error: BaseException) -> None:
        for job in {id(s.job): s.job for s in self._seqs.values()}.values():
            self._abort(job, error)
