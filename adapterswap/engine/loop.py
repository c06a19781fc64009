"""The serving engine: one loop per model replica that schedules every iteration. No Ray here.

Requests (generations, streams, prompt scoring) are submitted from any thread and queue
(bounded: a full queue raises ``Overloaded``). Each :meth:`Engine.step`:

1. **Leaves.** Cancelled rows (a client that went away) leave at once, wherever they are.
2. **Joins.** Waiting requests join, oldest first, while the batch has room (``max_rows``)
   and their whole KV reservation (prompt + ``max_tokens``) fits ``kv_tokens``, so a running
   row is never preempted. A request joins only once its adapters are ready and fit: with
   ``tiers``, its missing adapters were prefetched into the host tier when it was queued,
   and joining copies them into bank slots; while one still loads (``adapters_loading``),
   or while they would not fit in the bank beside the running rows' (``bank_full``: joining
   would evict a running row's adapter, thrash), it waits in the queue and later requests
   that are ready join past it, at most ``max_bypass`` of them, so it is not starved. No
   step waits for storage. A request whose mixture cannot be composed (a failed load, more
   adapters than the bank has slots) ends alone with that error. A load that finishes
   during the decode forward lets its row join right after it, in time for this step's
   prefill: a cold request waits for its load, not for the next step.
3. **Decode.** One forward of every decoding row (one token each) under the per-row mixture
   plan of exactly those rows.
4. **Prefill.** Up to ``prefill_tokens`` prompt tokens, oldest request first, one forward
   per prefilling row: a long prompt takes several steps, so it delays the running rows'
   decode by at most one chunk's time per step. A scoring row (``echo``) keeps every
   position's logits and leaves when its prompt is done.
5. **Sample** every row that has logits, under ``step_lock``, after checking the epoch:
   when it moved (one integer compare otherwise), rows whose mixture holds a revoked version
   stop at once (``finish_reason="abort"``). Streams get their text here. Rows that
   finished leave; rows whose prompt is done join the decode region.

Each row keeps its own KV cache row (``kv_slots``), positions and sampling generator, so its
output is the one it gets alone (exactly, in float64). A forward that raises is rerun row by
row: the row that fails ends alone with its error and the others continue.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterswap.compose.bank import AdapterBank
from adapterswap.engine.adapter_tiers import AdapterTiers
from adapterswap.engine.generation import (
    DecodeRow,
    abort_row,
    advance_row,
    attach_scores,
    cache_kwarg,
    eos_ids,
    new_row,
    record_logprobs,
)
from adapterswap.engine.kv_slots import SlotKVCache
from adapterswap.engine.requests import GenerationRequest, GenerationResult, PromptScores
from adapterswap.engine.sampling import sample_next
from adapterswap.engine.scoring import at_least_fp32, build_scores
from adapterswap.errors import InvalidArgument, Overloaded, StaleMixture
from adapterswap.types import Mixture

logger = logging.getLogger("adapterswap.engine")

# (mixtures of the running rows) -> indices of those holding a version no longer servable
_REVOKED = "a version of this request's mixture was revoked while it ran"
_IDLE_S = 1.0  # a background loop thread exits after this long without work
Revoked = Callable[[Sequence[Mixture]], Collection[int]]


@dataclass(eq=False)
class Work:
    """One request as the engine runs it; the caller keeps it to :meth:`cancel` it.

    ``on_token(delta)`` gets a generation's text as it becomes final; ``on_done(outcome)``
    is called once, from the engine's thread, with a :class:`GenerationResult` (generation),
    a :class:`PromptScores` (``score``), or the exception that ended the request alone.
    """

    prompt_ids: list[int]
    request: GenerationRequest | None  # None: score the prompt (``top_logprobs`` per token)
    mixture: Mixture
    on_done: Callable[[Any], None]
    on_token: Callable[[str], None] | None = None
    top_logprobs: int = 0
    queued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    cancelled: bool = False
    # Queued: why it waited (reasons counted once each), and later requests that joined past it
    deferred: set[str] = field(default_factory=set)
    passed_by: int = 0
    # Engine state, once admitted:
    slots: dict[int, float] = field(default_factory=dict)
    prefilled: int = 0  # prompt tokens in the KV cache
    row: DecodeRow | None = None  # generation state
    pending: int | None = None  # the sampled token the next decode forward feeds
    logprobs: list[float | None] = field(default_factory=list)  # scoring: per prompt token
    top: list[tuple[list[int], list[float]] | None] = field(default_factory=list)
    carry: tuple[torch.Tensor, torch.Tensor] | None = None  # scoring: last chunk's last z, lse

    @property
    def reserve(self) -> int:
        """KV tokens this request may need: its prompt and every token it may sample."""
        return len(self.prompt_ids) + (self.request.params.max_tokens if self.request else 0)

    def cancel(self) -> None:
        """Stop it: it leaves the engine at the next step (its ``on_done`` is not called)."""
        self.cancelled = True


@dataclass
class EngineStats:
    """What the engine did so far (counters) and holds now (gauges), for metrics."""

    queued: int = 0
    running: int = 0
    kv_tokens_reserved: int = 0
    steps: int = 0
    tokens_sampled: int = 0
    prompt_tokens: int = 0
    cancelled: int = 0
    revoked: int = 0
    failed: int = 0
    deferred_loading: int = 0  # requests that waited for their adapters to load
    deferred_bank_full: int = 0  # requests that waited for room in the bank
    compose_ms: float = 0.0  # setting the mixture plans of the latest step's forwards


class Engine:
    """Continuous batching over one model, with per-row adapter mixtures from ``bank``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        bank: AdapterBank | None = None,
        tiers: AdapterTiers | None = None,
        max_rows: int = 8,
        max_queue: int = 64,
        prefill_tokens: int = 256,
        kv_tokens: int = 8 * 2560,
        max_context: int = 2560,
        step_lock: threading.Lock | None = None,
        epoch: Callable[[], int] | None = None,
        revoked: Revoked | None = None,
        background: bool = False,
        max_bypass: int = 8,
    ) -> None:
        """``epoch`` and ``revoked`` read the active set: the engine calls ``revoked`` with
        every running row's mixture whenever ``epoch()`` differs from the last value it
        checked, under ``step_lock`` (the replica's sync takes it to wait for a step).
        ``tiers`` (over ``bank``): adapters are prefetched when a request is queued; without
        it, a mixture's adapters must already be in ``bank``. ``background``: steps run on a
        thread of the engine's own while there is work; otherwise the caller calls
        :meth:`step`. ``max_bypass``: later requests that may join past a waiting one."""
        self.model, self.tokenizer, self.bank, self.tiers = model, tokenizer, bank, tiers
        self.max_bypass = max_bypass
        self.max_rows, self.max_queue, self.prefill_tokens = max_rows, max_queue, prefill_tokens
        self.kv_tokens, self.max_context = kv_tokens, max_context
        self.kv = self._new_kv()
        self.stats = EngineStats()
        self._eos = eos_ids(model, tokenizer)
        self._cache_kwarg = cache_kwarg(type(model))
        self._step_lock = step_lock or threading.Lock()
        self._epoch, self._revoked = epoch, revoked
        self._checked = epoch() if epoch else 0
        self._queue: deque[Work] = deque()
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._poked = False  # a wake() since the last admission pass
        self._blocked = False  # the last step ran nothing while requests waited
        self.background = background
        if tiers is not None:
            tiers.on_ready = _calling_weakly(self.wake)  # a load finished: a row may join

    def _new_kv(self) -> SlotKVCache:
        param = next(self.model.parameters())
        with torch.inference_mode():
            return SlotKVCache(
                self.model.config,
                dtype=param.dtype,
                device=param.device,
                max_rows=self.max_rows,
                max_width=self.max_context,
            )

    # -- the caller's side ----------------------------------------------------------------

    def submit(self, work: Work) -> Work:
        """Queue ``work`` for the next step. Raises ``InvalidArgument`` (HTTP 400) for a request
        that can never fit, ``Overloaded`` (HTTP 503) when the queue is full."""
        if not work.prompt_ids:
            raise ValueError("prompt_ids is empty: a prompt needs at least one token")
        if work.reserve > self.max_context:
            what = "prompt" if work.request is None else "prompt + max_tokens"
            raise InvalidArgument(
                f"{what} is {work.reserve} tokens, over the model's context of "
                f"{self.max_context} on this server; shorten the prompt or lower max_tokens"
            )
        if work.reserve > self.kv_tokens:
            raise InvalidArgument(
                f"prompt + max_tokens is {work.reserve} tokens, over serve.kv_cache_tokens="
                f"{self.kv_tokens}; shorten the prompt or lower max_tokens"
            )
        if work.request is not None and work.request.params.max_tokens <= 0:
            prompt = len(work.prompt_ids)  # nothing to generate: no forward at all
            work.on_done(GenerationResult([], "", "length", prompt, 0, queue_s=0.0))
            return work
        if self.tiers is not None and work.mixture:
            self.tiers.prefetch(ref for ref, _ in work.mixture)  # loads while it queues
        with self._wake:
            if len(self._queue) >= self.max_queue:
                raise Overloaded(
                    f"the model replica's queue is full ({self.max_queue} requests); retry shortly"
                )
            self._queue.append(work)
            self.stats.queued = len(self._queue)
            self._ensure_thread()
            self._wake.notify()
        return work

    def _ensure_thread(self) -> None:
        """With ``background``: a loop thread runs while there is work (the caller holds
        ``_wake``). It holds the engine only weakly while it waits, and exits after
        ``_IDLE_S`` idle, so an engine nobody uses any more is collected with its model."""
        if self.background and not self._stopping and self._thread is None:
            self._thread = threading.Thread(
                target=_serve, args=(weakref.ref(self),), name="adapterswap-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread for good (what is queued or running is dropped)."""
        with self._wake:
            self._stopping = True
            thread = self._thread
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def wake(self) -> None:
        """Make an idle loop look again (a cancellation, a load that finished)."""
        with self._wake:
            self._poked = True
            self._wake.notify()

    def _reset(self) -> None:
        """Fail every running row and start from an empty KV cache (after a bug in a step)."""
        works, self.kv = list(self.kv.owners), self._new_kv()
        for work in works:
            self.stats.failed += 1
            if self.bank is not None and work.slots:
                self.bank.unpin(work.slots)
                work.slots = {}
            work.on_done(RuntimeError("the engine step failed"))

    # -- one iteration --------------------------------------------------------------------

    def step(self) -> None:
        """One iteration: leaves, joins, decode, prefill, sample (see the module docstring)."""
        self.stats.steps += 1
        self.stats.compose_ms = 0.0
        # The KV cache's tensors are made and changed in inference mode only.
        with torch.inference_mode():
            for work in [w for w in self.kv.owners if w.cancelled]:
                self._leave(work)
                self.stats.cancelled += 1
            self._admit()
            logits: dict[int, torch.Tensor] = {}  # id(work) -> next-token logits (V,)
            self._decode(logits)
            if self._poked:  # a load finished during the decode: its row prefills now
                self._admit()
            self._prefill(logits)
            self._sample(logits)
        if not self.kv.count and self.bank is not None:
            self.bank.use([])  # idle: the model is the base model, no row's adapters set
        self.stats.running = self.kv.count
        self.stats.queued = len(self._queue)
        self.stats.kv_tokens_reserved = sum(w.reserve for w in self.kv.owners)

    def _admit(self) -> None:
        """Join the queued requests that are ready, oldest first (see the module docstring)."""
        reserved = sum(w.reserve for w in self.kv.owners)
        with self._wake:
            self._poked = False
            queued = list(self._queue)
        waiting: list[Work] = []  # ready-or-not requests passed over this step, oldest first
        for work in queued:
            if work.cancelled:
                self._dequeue(work)
                self.stats.cancelled += 1
                continue
            if self.kv.count >= self.max_rows or reserved + work.reserve > self.kv_tokens:
                break
            if waiting and waiting[0].passed_by >= self.max_bypass:
                break  # the oldest waiting request has been passed enough: the rest wait
            try:
                wait = self._join(work)
            except Exception as exc:  # noqa: BLE001 - this request fails, alone
                self._dequeue(work)
                work.on_done(exc)
                continue
            if wait is not None:
                self._defer(work, wait)
                waiting.append(work)
                continue
            for w in waiting:
                w.passed_by += 1
            reserved += work.reserve
        self._blocked = bool(self._queue) and not self.kv.count

    def _join(self, work: Work) -> str | None:
        """Admit ``work`` into the batch, or say why it must wait (its adapters are loading,
        or would not fit in the bank); raises what ends it."""
        if self._revoked is not None and self._revoked([work.mixture]):
            raise StaleMixture("a version of this request's mixture is not active")
        if work.mixture and self.bank is not None:
            refs = {ref for ref, _ in work.mixture}
            parsed = self.tiers.ready(refs) if self.tiers is not None else {}
            if parsed is None:
                return "adapters_loading"
            if not self.bank.fits(refs):  # raises if the mixture alone exceeds the bank
                return "bank_full"
            if self.tiers is not None:
                work.slots = self.tiers.pin(work.mixture, parsed)
            else:
                work.slots = self.bank.pin(work.mixture)
        self._dequeue(work)
        work.admitted_at = time.perf_counter()
        if work.request is not None:
            work.row = new_row(next(self._ids), work.request, self.tokenizer)
        self.kv.add(work)
        return None

    def _dequeue(self, work: Work) -> None:
        with self._wake:
            self._queue.remove(work)
            self.stats.queued = len(self._queue)

    def _defer(self, work: Work, reason: str) -> None:
        """Count a waiting request once per reason it waited for."""
        if reason not in work.deferred:
            work.deferred.add(reason)
            if reason == "adapters_loading":
                self.stats.deferred_loading += 1
            else:
                self.stats.deferred_bank_full += 1

    def _use(self, works: Sequence[Work]) -> None:
        if self.bank is not None:
            started = time.perf_counter()
            self.bank.use([w.slots for w in works])
            self.stats.compose_ms += 1000 * (time.perf_counter() - started)

    def _forward(self, works: Sequence[Work], tokens: Sequence[Sequence[int]], keep: int) -> Any:
        """One forward of ``works``' new ``tokens`` (right-padded); logits of the last ``keep``
        positions (0: all)."""
        rows = [self.kv.index(w) for w in works]
        q = max(len(t) for t in tokens)
        ids = torch.zeros((len(works), q), dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor(t)
        positions, mask = self.kv.view(rows, q, next(self.model.parameters()).dtype)
        self._use(works)
        out = self.model(
            input_ids=ids.to(positions.device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kwarg: self.kv},
        )
        self.kv.advance(rows, [len(t) for t in tokens])
        return out.logits

    def _decode(self, logits: dict[int, torch.Tensor]) -> None:
        works = [w for w in self.kv.owners[: self.kv.decoding] if w.pending is not None]
        if not works:
            return
        try:
            out = self._forward(works, [[w.pending] for w in works], 1)  # (B,1,V)
            for b, w in enumerate(works):
                logits[id(w)] = out[b, -1]
        except Exception:  # noqa: BLE001 - find the row that failed it
            logger.warning("a decode step of %d rows failed; running them one by one", len(works))
            for w in works:
                try:
                    logits[id(w)] = self._forward([w], [[w.pending]], 1)[0, -1]
                except Exception as exc:  # noqa: BLE001 - this row fails, alone
                    self._fail(w, exc)
        for w in works:
            w.pending = None

    def _prefill(self, logits: dict[int, torch.Tensor]) -> None:
        budget = self.prefill_tokens
        prefilling = self.kv.owners[self.kv.decoding :]
        for w in sorted(prefilling, key=lambda w: w.admitted_at or 0.0):
            if budget <= 0:
                break
            n = min(len(w.prompt_ids) - w.prefilled, budget)
            chunk = w.prompt_ids[w.prefilled : w.prefilled + n]
            try:
                out = self._forward([w], [chunk], 0 if w.request is None else 1)
            except Exception as exc:  # noqa: BLE001 - this row fails, alone
                self._fail(w, exc)
                continue
            budget -= n
            self.stats.prompt_tokens += n
            if w.request is None:
                self._score_chunk(w, chunk, out[0])
            w.prefilled += n
            if w.prefilled == len(w.prompt_ids) and w.request is not None:
                logits[id(w)] = out[0, -1]

    def _score_chunk(self, work: Work, chunk: list[int], out: torch.Tensor) -> None:
        """Log p of each prompt token from the positions before it.  out: (n,V)"""
        z = at_least_fp32(out)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        start = work.prefilled
        if start == 0:
            work.logprobs.append(None)
            work.top.append(None)
        else:  # the previous chunk's last position predicted this chunk's first token
            assert work.carry is not None
            self._score_targets(work, work.carry, [chunk[0]])
        self._score_targets(work, (z[:-1], lse[:-1]), chunk[1:])
        work.carry = (z[-1:], lse[-1:])

    def _score_targets(
        self, work: Work, zl: tuple[torch.Tensor, torch.Tensor], targets: list[int]
    ) -> None:
        z, lse = zl
        if not targets:
            return
        lp = z.gather(-1, torch.tensor(targets, device=z.device)[:, None]).squeeze(-1) - lse
        work.logprobs.extend(lp.tolist())
        if work.top_logprobs:
            values, indices = z.topk(min(work.top_logprobs, z.shape[-1]), dim=-1)
            values = values - lse[:, None]
            work.top.extend(zip(indices.tolist(), values.tolist(), strict=True))
        else:
            work.top.extend([None] * len(targets))

    def _sample(self, logits: dict[int, torch.Tensor]) -> None:
        done: list[tuple[Work, Any]] = []
        with self._step_lock:
            stopped = self._stale()
            live = []
            for w in list(self.kv.owners):
                if w in stopped:
                    if w.row is not None:
                        abort_row(w.row)
                    done.append((w, "abort"))
                elif w.request is None and w.prefilled == len(w.prompt_ids):
                    top = w.top if w.top_logprobs else None
                    done.append((w, build_scores(self.tokenizer, w.prompt_ids, w.logprobs, top)))
                elif id(w) in logits and not w.cancelled:
                    live.append(w)
            if live:
                rows = [w.row for w in live]
                z = torch.stack([logits[id(w)] for w in live])  # (L,V)
                tokens = sample_next(z, [r.params for r in rows], [r.generator for r in rows])
                record_logprobs(z, rows, tokens)
                for w, token in zip(live, tokens, strict=True):
                    self._advance(w, token)
                    if w.row.result is not None:
                        done.append((w, w.row.result))
                    else:
                        w.pending = token
        for w, outcome in done:
            self._leave(w)
            if outcome == "abort":
                self.stats.revoked += 1
                w.on_done(self._result(w) if w.row else StaleMixture(_REVOKED))
            elif isinstance(outcome, PromptScores):
                w.on_done(outcome)
            else:
                w.on_done(self._result(w))
        for w in live if logits else []:
            if w.row.result is None and self.kv.index(w) >= self.kv.decoding:
                self.kv.promote(self.kv.index(w))

    def _result(self, work: Work) -> GenerationResult:
        """A finished row's result, with its scores (if asked) and its timings."""
        assert work.row is not None and work.admitted_at is not None
        first = work.first_token_at
        return dataclasses.replace(
            attach_scores(work.row, self.tokenizer),
            queue_s=work.admitted_at - work.queued_at,
            first_token_s=None if first is None else first - work.queued_at,
            finish_s=time.perf_counter() - work.queued_at,
        )

    def _advance(self, work: Work, token: int) -> None:
        row = work.row
        if work.first_token_at is None:
            work.first_token_at = time.perf_counter()
        self.stats.tokens_sampled += 1
        on_token = None
        if work.on_token is not None:
            on_token = lambda _, delta: work.on_token(delta)  # noqa: E731
        try:
            advance_row(row, token, self._eos, on_token)
        except Exception:  # noqa: BLE001 - the caller's callback: its client went away
            logger.info("a stream's consumer failed; cancelling the row", exc_info=True)
            work.cancel()

    def _stale(self) -> set[Work]:
        """The rows to stop: those whose mixture holds a revoked version, when the epoch moved."""
        if self._epoch is None or self._revoked is None:
            return set()
        epoch = self._epoch()
        if epoch == self._checked:
            return set()
        works = list(self.kv.owners)
        gone = self._revoked([w.mixture for w in works])
        self._checked = epoch
        return {works[i] for i in gone}

    def _leave(self, work: Work) -> None:
        self.kv.remove(self.kv.index(work))
        if self.bank is not None and work.slots:
            self.bank.unpin(work.slots)
            work.slots = {}

    def _fail(self, work: Work, exc: BaseException) -> None:
        self.stats.failed += 1
        if work in self.kv.owners:
            self._leave(work)
        work.on_done(exc)


def _calling_weakly(method: Callable[[], None]) -> Callable[[], None]:
    """``method``, doing nothing once its object is gone (a callback must not keep it)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _serve(ref: weakref.ref[Engine]) -> None:
    """A background engine's loop: step while there is work; between steps, hold the engine
    only through ``ref``."""
    while (engine := ref()) is not None:
        wake = engine._wake
        with wake:
            idle = not engine._queue and not engine.kv.count
            # Nothing runs and the queued requests wait for loads: sleep until one finishes.
            blocked = engine._blocked and not engine.kv.count and not engine._poked
            if not engine._stopping and (idle or blocked):
                del engine  # waiting must not keep it alive
                wake.wait(_IDLE_S)
                if (engine := ref()) is None:
                    return
            if engine._stopping or (not engine._queue and not engine.kv.count):
                engine._thread = None
                return
        try:
            engine.step()
        except Exception:  # noqa: BLE001 - a bug: fail what runs, start afresh, keep serving
            logger.exception("the engine step failed; failing the rows it ran")
            engine._reset()
        del engine
