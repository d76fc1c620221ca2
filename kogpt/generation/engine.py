"""The one decode loop: requests share one KV cache, each in its own row; one step decodes them all.

`Engine` owns the loop: `submit` queues a Request (prompt ids, budget, sampling, EOS ids, RNG, stop
callback, hooks); each `step` prefills queued requests into free rows, samples the next token of
every running row and runs one batched cached forward. Rows keep their own lengths and positions,
so prompts of any lengths batch without padding, and a request can join while others decode
(continuous batching). Per-request features (PPLM, logit masks, ...) are RequestHooks (hooks.py)
that the loop calls around the request's row without knowing what they do. A request with
`speculate=k` (and no hooks that act per step) puts up to k drafted ids (speculative.py) after its last id in the same
forward; the next step keeps the drafts its sampler agrees with and cuts its cache row back, so it
emits the same tokens (greedy) or distribution (sampling) as without, often several per step. A
request whose own prefill or hooks fail (say, out of memory) ends alone with finish "error" and the
exception in Event.error; the batch goes on. `generate` runs a fixed set of prompts through an Engine
and raises such an error; callers own prompt formats, stop strings and detokenizing — this module
sees ids only.

    for ev in generate(model, [ids], max_new_tokens=32, sampling=GREEDY): print(ev.token)
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import UserError
from ..core.kv_cache import KVCache
from ..core.model import GPT
from .hooks import RequestHook
from .sampling import GREEDY, SamplingConfig, sample
from .speculative import draft, verify

log = logging.getLogger(__name__)
StepFn = Callable[[GPT, torch.Tensor, KVCache, slice], torch.Tensor]


def decode_step(model: GPT, tok: torch.Tensor, cache: KVCache, rows: slice) -> torch.Tensor:
    """One cached step for cache rows `rows`: tok (B, 1) -> next-token logits (B, V)."""
    return model(tok, cache, rows)[:, -1]


@dataclass
class Request:
    ids: Sequence[int]  # the prompt, at least one id
    max_new_tokens: int
    sampling: SamplingConfig = GREEDY
    eos_ids: Sequence[int] = ()
    rng: torch.Generator | None = None
    stop: Callable[[int], bool] | None = None  # called with each new non-EOS id; True ends the request
    key: Any = None  # the caller's handle, echoed in every Event
    logprobs: int | None = None  # report the chosen id's log-probability and this many top alternatives
    hooks: Sequence[RequestHook] = ()  # this request's own features (hooks.py), called in this order
    speculate: int = 0  # draft up to this many ids per step (speculative.py); 0: off; not with per-step hooks


@dataclass(frozen=True)
class Event:
    key: Any  # Request.key
    token: int  # the new id (-1 when a request ends without one: a zero budget, cancel or error)
    finish: str | None = None  # None while the request continues; "stop" (EOS or stop()), "length" or "error"
    is_eos: bool = False
    logprob: float | None = None  # log p(token) under the model (before sampling processors), if asked
    top: tuple[tuple[int, float], ...] = ()  # the Request.logprobs most likely (id, log p), if asked
    error: Exception | None = None  # why the request failed (finish "error"); the others go on


@dataclass
class _Active:
    """A running request in its cache row."""

    req: Request
    history: list[int]  # prompt + generated ids (repetition penalty, n-gram bans, drafts)
    logits: torch.Tensor | None = None  # (1 + len(drafted), V) next-token logits, waiting to be sampled
    drafted: list[int] = field(default_factory=list)  # ids that went through the forward after history[-1]
    lookahead: int = 0  # ids to draft next (up to req.speculate): +2 after a fully kept draft, -1 after a miss
    generated: int = 0
    wants_ids: bool = field(init=False)
    stepping: tuple[RequestHook, ...] = field(init=False)  # the hooks called around every step

    def __post_init__(self):
        self.wants_ids = bool(self.req.sampling.penalties())
        self.stepping = tuple(h for h in self.req.hooks if h.per_step)


class Engine:
    """A KV cache of `slots` rows and the requests in them (see the module docstring)."""

    def __init__(self, model: GPT, slots: int, max_len: int | None = None, step_fn: StepFn = decode_step):
        cfg = model.config
        self.model, self.step_fn = model, step_fn
        self.max_len = min(max_len or cfg.n_positions, cfg.n_positions)
        w = model.wte.weight
        self.cache = KVCache.for_model(cfg, slots, self.max_len, w.dtype, w.device)
        self.queue: deque[Request] = deque()
        self.rows: dict[int, _Active] = {}  # cache row -> request in it
        self.drafted = self.accepted = 0  # ids drafted and accepted so far (speculation's acceptance rate)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.rows

    @property
    def free_slots(self) -> int:
        return self.cache.batch_size - len(self.rows)

    def submit(self, req: Request) -> None:
        """Queue a request; it starts at the next step with a free row. Bad prompts raise UserError."""
        if not req.ids:
            raise UserError("a prompt is empty; give it at least one token (e.g. the BOS id)")
        if len(req.ids) >= self.max_len:
            raise UserError(f"the prompt has {len(req.ids)} tokens; the context holds {self.max_len}")
        if max(req.ids) >= self.model.config.vocab_size or min(req.ids) < 0:
            raise UserError(f"prompt ids must be in [0, {self.model.config.vocab_size})")
        if not isinstance(req.speculate, int) or req.speculate < 0:
            raise UserError(f"speculate must be a whole number >= 0 (0: off), got {req.speculate!r}")
        self.queue.append(req)

    def cancel(self, key: Any) -> bool:
        """Drop a queued or running request (e.g. its client went away); True if it was found."""
        for req in list(self.queue):
            if req.key == key:
                self.queue.remove(req)
                return True
        for row, a in list(self.rows.items()):
            if a.req.key == key:
                error = self._release(row)
                if error is not None:  # nobody waits for this request's outcome any more
                    log.warning("a hook of cancelled request %r failed to finish", key, exc_info=error)
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit queued requests, sample one token (or verify drafts) for every running request, decode
        them together (each request's hooks act just before and just after that forward)."""
        events: list[Event] = []
        self._admit(events)
        self._sample(events)
        self._draft()
        for row, a in list(self.rows.items()):
            if a.stepping:
                with self._failing_alone(row, events):
                    for hook in a.stepping:
                        hook.before_step(self.model, self.cache, row, a.history)
        if self.rows:
            hi = max(self.rows) + 1  # decode rows [0, hi); free rows in between carry a dummy token
            T = 1 + max(len(a.drafted) for a in self.rows.values())  # shorter drafts are padded
            ids = [[0] * T for _ in range(hi)]
            for row, a in self.rows.items():
                ids[row][:1 + len(a.drafted)] = [a.history[-1], *a.drafted]
            tok = torch.tensor(ids, device=self.cache.k.device)  # (hi, T): one tensor a step
            if T == 1:
                logits = self.step_fn(self.model, tok, self.cache, slice(0, hi))[:, None]  # (hi, 1, V)
            else:  # verification needs every position's logits: the eager forward
                logits = self.model(tok, self.cache, slice(0, hi))  # (hi, T, V)
            for row, a in list(self.rows.items()):
                a.logits = logits[row, :1 + len(a.drafted)]
                if len(a.drafted) < T - 1:  # the padding is no part of the row
                    self.cache.truncate(row, len(a.history) + len(a.drafted))
                if a.stepping:
                    with self._failing_alone(row, events):
                        a.logits = _map_logits(a.stepping, a.logits[0])[None]
            self.cache.lengths[[r for r in range(hi) if r not in self.rows]] = 0
        return events

    def _admit(self, events: list[Event]) -> None:
        while self.queue and self.free_slots:
            req = self.queue.popleft()
            budget = min(req.max_new_tokens, self.max_len - len(req.ids))
            if budget <= 0:
                events.append(Event(req.key, -1, "length"))
                continue
            req.max_new_tokens = budget
            row = min(set(range(self.cache.batch_size)) - set(self.rows))
            self.cache.reset(slice(row, row + 1))
            self.rows[row] = a = _Active(req, list(req.ids))
            with self._failing_alone(row, events):
                logits = self._prefill(req, row, budget)
                a.logits = None if logits is None else logits[None]

    def _prefill(self, req: Request, row: int, budget: int) -> torch.Tensor | None:
        """Put the prompt in cache row `row` and start the hooks; the next-token logits, or None when a
        hook holds the last prompt token back for this step's forward (its logits are sampled next step)."""
        for hook in req.hooks:
            hook.admit(self.cache, row)
        held = any(hook.steps_last_prompt_token for hook in req.hooks)
        prefill = list(req.ids)[:-1] if held else list(req.ids)
        logits = None
        if prefill:
            ids = torch.tensor([prefill], dtype=torch.long, device=self.cache.k.device)
            logits = self.model(ids, self.cache, slice(row, row + 1), last_only=True)[0, -1]
        for hook in req.hooks:
            hook.start(self.cache, row, len(req.ids) + budget)
        return None if held else _map_logits(self.rows[row].stepping, logits)

    @contextmanager
    def _failing_alone(self, row: int, events: list[Event]) -> Iterator[None]:
        """Run work of row `row`'s own request (its prefill, its hooks): an exception (say, out of memory)
        ends that request alone with finish "error" and frees its row; the batch goes on."""
        try:
            yield
        except Exception as e:
            key = self.rows[row].req.key
            self._release(row)  # a hook's finish error, if any, is second to this one
            events.append(Event(key, -1, "error", error=e))

    def _sample(self, events: list[Event]) -> None:
        groups: dict[tuple, list[int]] = {}  # rows sharing sampling settings and RNG sample together
        for row, a in list(self.rows.items()):
            if a.drafted:
                self._verify(row, events)
            elif a.logits is not None:  # None: the last prompt token goes through this step (hooks.py)
                groups.setdefault((a.req.sampling, id(a.req.rng)), []).append(row)
        for rows in groups.values():
            first = self.rows[rows[0]].req
            logits = torch.stack([self.rows[r].logits[0].float() for r in rows])  # (G, V)
            tok = sample(logits, self._history(rows), first.sampling, first.rng).tolist()
            for i, (row, t) in enumerate(zip(rows, tok)):
                events.append(self._advance(row, t, logits[i]))

    def _verify(self, row: int, events: list[Event]) -> None:
        """Emit row `row`'s accepted drafts and the model's next id, one Event each (a stop, EOS or the
        budget ends it mid-draft); cut its cache row back to the ids kept."""
        a = self.rows[row]
        logits, drafted = a.logits.float(), a.drafted
        a.drafted = []
        emitted = verify(logits, a.history, drafted, a.req.sampling, a.req.rng)
        self.drafted, self.accepted = self.drafted + len(drafted), self.accepted + len(emitted) - 1
        kept_all = len(emitted) > len(drafted)  # transformers' heuristic for assisted generation
        a.lookahead = min(a.req.speculate, a.lookahead + 2) if kept_all else max(1, a.lookahead - 1)
        for i, tok in enumerate(emitted):
            events.append(self._advance(row, tok, logits[i]))
            if row not in self.rows:  # finished
                return
        self.cache.truncate(row, len(a.history) - 1)  # the newest id goes through the next forward

    def _draft(self) -> None:
        """Draft ids for the requests that speculate, within their budgets and the cache's room."""
        speculating = [a for a in self.rows.values() if a.req.speculate and not a.stepping]
        if not speculating:
            return
        room = self.max_len - max(len(a.history) for a in self.rows.values())  # every row writes 1 + max draft
        for a in speculating:
            a.lookahead = a.lookahead or a.req.speculate
            a.drafted = draft(a.history, min(a.lookahead, a.req.max_new_tokens - a.generated - 1, room))

    def _history(self, rows: list[int]) -> torch.Tensor:
        """(G, T) ids of the rows, left-filled with V (ignored by the processors); (G, 0) if unused."""
        device = self.cache.k.device
        if not self.rows[rows[0]].wants_ids:
            return torch.empty(len(rows), 0, dtype=torch.long, device=device)
        hist = [self.rows[r].history for r in rows]
        T = max(len(h) for h in hist)
        out = torch.full((len(rows), T), self.model.config.vocab_size, dtype=torch.long)
        for i, h in enumerate(hist):
            out[i, T - len(h):] = torch.tensor(h)
        return out.to(device)

    def _advance(self, row: int, tok: int, logits: torch.Tensor) -> Event:
        a = self.rows[row]
        logprob, top = None, ()
        if a.req.logprobs is not None:
            logp = logits.float().log_softmax(-1)  # (V,)
            logprob = logp[tok].item()
            if a.req.logprobs > 0:
                values, ids = logp.topk(min(a.req.logprobs, logp.numel()))
                top = tuple(zip(ids.tolist(), values.tolist()))
        a.generated += 1
        a.history.append(tok)
        a.logits = None
        is_eos = tok in a.req.eos_ids
        finish = None
        if is_eos or (a.req.stop is not None and a.req.stop(tok)):
            finish = "stop"
        elif a.generated >= a.req.max_new_tokens:
            finish = "length"
        error = None
        if finish:
            error = self._release(row)
            if error is not None:  # a hook failed to end: the token stands, the request failed
                finish = "error"
        return Event(a.req.key, tok, finish, is_eos, logprob, top, error)

    def _release(self, row: int) -> Exception | None:
        """Free cache row `row` and finish its request's hooks; the first error a finish raised, if any."""
        a = self.rows.pop(row)
        self.cache.reset(slice(row, row + 1))
        error = None
        for hook in a.req.hooks:
            try:
                hook.finish()
            except Exception as e:  # the other hooks still free what they hold
                error = error or e
        return error


def _map_logits(hooks: Sequence[RequestHook], logits: torch.Tensor) -> torch.Tensor:
    for hook in hooks:
        logits = hook.map_logits(logits)
    return logits


def generate(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             sampling: SamplingConfig = GREEDY, eos_ids: Sequence[int] = (), rng: torch.Generator | None = None,
             stop: Callable[[int, int], bool] | None = None, step_fn: StepFn = decode_step,
             hooks: Sequence[Sequence[RequestHook]] | None = None, speculate: int = 0) -> Iterator[Event]:
    """Yield an Event per new token of each prompt (Event.key is the prompt's index), in step order.

    max_new_tokens: one budget for all prompts or one per prompt; capped so prompt + new tokens fit
    the context. stop(index, token) -> True ends that prompt with finish "stop". hooks: the
    RequestHooks of each prompt (a sequence per prompt, maybe empty; a hook serves one request).
    speculate: draft up to this many ids per step (Request.speculate).
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError("max_new_tokens needs one budget per prompt")
    per_prompt = list(hooks) if hooks is not None else [()] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError("hooks needs one sequence of hooks per prompt")
    if not prompts:
        return
    need = max(len(p) + max(n, 1) for p, n in zip(prompts, budgets))  # a zero budget still fits its prompt
    engine = Engine(model, slots=len(prompts), max_len=need, step_fn=step_fn)
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        engine.submit(Request(p, n, sampling, tuple(eos_ids), rng, None if stop is None else _bind(stop, i), key=i,
                              hooks=tuple(per_prompt[i]), speculate=speculate))
    while not engine.idle:
        for ev in engine.step():
            if ev.error is not None:
                raise ev.error
            yield ev


def _bind(stop: Callable[[int, int], bool], i: int) -> Callable[[int], bool]:
    return lambda tok: stop(i, tok)


def generate_ids(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 sampling: SamplingConfig = GREEDY, eos_ids: Sequence[int] = (),
                 rng: torch.Generator | None = None, hooks: Sequence[Sequence[RequestHook]] | None = None,
                 step_fn: StepFn = decode_step, speculate: int = 0) -> list[list[int]]:
    """The new ids of each prompt (an ending EOS id included, as transformers returns it)."""
    out: list[list[int]] = [[] for _ in prompts]
    for ev in generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids, rng=rng,
                       hooks=hooks, step_fn=step_fn, speculate=speculate):
        if ev.token >= 0:
            out[ev.key].append(ev.token)
    return out
