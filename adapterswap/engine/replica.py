"""A model replica: one frozen base model, an adapter bank, generation and scoring. No Ray here.

The Ray Serve model deployment wraps this class; tests drive it directly. A replica serves a
batch of jobs, each with its own adapter mixture, in one forward per step:
``with bank.mixture(rows): generate_batch(...)``.

Removal: no token is produced with a revoked version after the acknowledgement.

- Before every batch the replica syncs with the store's epoch (a cheap read when nothing
  changed) and refuses a job naming a version its view no longer holds (``StaleMixture``:
  the gateway routes it again).
- While a batch runs, every step's sampling and streaming run under the replica's step lock,
  after comparing the active set's epoch with the one the batch last checked (one integer).
  When it moved, every row whose mixture holds a version that left the set stops at once
  and gets a ``StaleMixture``: a stream ends with an ``adapter_revoked`` error event, a
  non-streaming request is routed again and rerun from the start. A scoring job is checked
  the same way after its forward.
- :meth:`ModelReplica.sync`, whose epoch the watcher acknowledges, applies the new set and
  then takes the step lock once: a step that was sampling finishes first, and every later
  step sees the new epoch. So the acknowledgement never waits for a forward or an adapter
  load, and no token is sampled with a revoked version after it.

Failures are per row. Each job is tokenised, its mixture validated and its adapters loaded
before it joins a batch; if the batch still fails, its rows run again one at a time, so the
culprit fails alone and the others get what they would have got without it. A row's error
is one of: ``StaleMixture``, ``PayloadTooLarge``, ``InvalidArgument``, ``InvalidMixture``,
``SlotsExhausted``, :class:`AdapterLoadFailed`, :class:`GenerationFailed`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from adapterswap.compose.bank import AdapterBank
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.engine.generation import StepGuard, TokenCallback, generate_batch
from adapterswap.engine.requests import (
    GenerationRequest,
    GenerationResult,
    PromptScores,
    SamplingParams,
)
from adapterswap.engine.scoring import score_prompts
from adapterswap.engine.text import apply_chat_template
from adapterswap.errors import (
    AdapterLoadFailed,
    AdapterSwapError,
    BaseModelMismatch,
    GenerationFailed,
    InvalidAdapter,
    InvalidArgument,
    InvalidMixture,
    PayloadTooLarge,
    StaleMixture,
)
from adapterswap.models.base import LoadedModel, hash_base_model, load_base_model
from adapterswap.route.active_set import ActiveSet, Snapshot
from adapterswap.storage.layout import StorageLayout
from adapterswap.types import AdapterRef, Mixture

logger = logging.getLogger("adapterswap.replica")
_LOAD_FAILED = (
    "an adapter this request needs could not be loaded on the model replica; the server "
    "logged the details"
)


@dataclass(frozen=True)
class InferenceJob:
    """One request's work for a model replica: a prompt or a chat, sampling, its mixture.

    One of ``prompt`` (text), ``token_ids`` (a prompt already tokenised, as OpenAI's API
    takes it) or ``messages`` (a chat). The replica tokenises and checks token ids against
    its own vocabulary, so the prompt-length limit is enforced here: over
    ``serve.max_prompt_tokens`` is a PayloadTooLarge (HTTP 413).
    """

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mixture: Mixture = ()


class ModelReplica:
    """One base model per replica, composing adapters per row of each batch."""

    def __init__(
        self,
        config: AdapterSwapConfig,
        snapshot: Snapshot,
        loaded: LoadedModel | None = None,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        """``snapshot`` and ``epoch`` read the store (see :class:`ActiveSet`)."""
        self.loaded = loaded or load_base_model(config.model, config.model_cache_dir)
        self.tokenizer = self.loaded.tokenizer
        self.bank = AdapterBank.from_settings(self.loaded.model, config.lora, config.serve)
        base_hash = hash_base_model(config.model, config.model_cache_dir)
        self.source = StorageAdapterSource(StorageLayout.from_config(config), base_hash)
        self.active = ActiveSet(snapshot, self._drop, epoch)
        self.max_prompt_tokens = config.serve.max_prompt_tokens
        self.last_composition_ms = 0.0  # mixture setup of the latest batch (a metric)
        self.adapter_hits = self.adapter_misses = 0  # jobs' adapters found loaded, or not
        self._lock = threading.Lock()  # the bank holds one mixture at a time
        # Held while a step samples and streams (and while a score is checked): a sync waits
        # for that, never for a forward.
        self._step = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def _drop(self, keep: set[AdapterRef]) -> list[AdapterRef]:
        self.source.forget(keep)
        return self.bank.evict_all_except(keep)

    # -- the epoch ----------------------------------------------------------------------

    def sync(self) -> int:
        """Catch up with the store; returns the epoch this replica may acknowledge.

        Every version revoked at or before it is evicted, and no step samples with one any
        more: a step sampling when the new set was applied finishes first (the step lock),
        and every later step checks the new epoch before it samples.
        """
        epoch = self.active.sync().epoch
        with self._step:
            pass
        return epoch

    def _gone(self, mixtures: Sequence[Mixture]) -> list[int]:
        """Indices of the mixtures holding a version that is not in the active set."""
        active = self.active.refs()
        return [k for k, mixture in enumerate(mixtures) if any(r not in active for r, _ in mixture)]

    def _step_guard(self, mixtures: Sequence[Mixture], admitted: int) -> StepGuard:
        """The decode loop's guard around every step's sampling: the rows to stop first.

        ``admitted`` is the epoch the batch's jobs were checked at. One int compare per step
        unless the epoch moved since the last check.
        """
        checked = admitted

        @contextmanager
        def guard() -> Iterator[Collection[int]]:
            nonlocal checked
            with self._step:
                epoch = self.active.epoch  # read before refs(): the set seen is at least this new
                if epoch == checked:
                    yield ()
                    return
                gone = self._gone(mixtures)
                checked = epoch
                yield gone

        return guard

    def _revoked(self, job: InferenceJob) -> StaleMixture:
        """The error of a row stopped because a version of its mixture was revoked."""
        active = self.active.refs()
        gone = sorted(ref for ref, _ in job.mixture if ref not in active)
        ref = gone[0] if gone else job.mixture[0][0]
        return StaleMixture(
            f"adapter {ref.id!r} version {ref.version} was revoked while this request ran (a "
            "document it was trained on was deleted); the request stopped there and nothing "
            "after that point was produced with it; send the request again"
        )

    def _drop_inactive(self) -> None:
        """Evict what a load installed after a revocation's eviction pass had run."""
        active = self.active.refs()
        if any(ref not in active for ref in self.bank.loaded()):
            self._drop(active)

    # -- admission ------------------------------------------------------------------------

    def prompt_ids(self, job: InferenceJob) -> list[int]:
        """Tokenise a job: the chat template for messages, the plain prompt otherwise."""
        try:
            if job.token_ids is not None:
                ids = self._known_ids(job.token_ids)
            elif job.messages is not None:
                for i, message in enumerate(job.messages):
                    for key, value in message.items():
                        if isinstance(value, str):
                            _check_text(value, f"messages[{i}].{key}")
                ids = apply_chat_template(self.tokenizer, list(job.messages))
            else:
                _check_text(job.prompt or "", "prompt")
                ids = self.tokenizer(job.prompt or "", add_special_tokens=False)["input_ids"]
        except AdapterSwapError:
            raise
        except ValueError as exc:  # apply_chat_template's own message: no template
            raise InvalidArgument(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the tokenizer or template refused the text
            logger.info("tokenisation failed: %s", type(exc).__name__)
            where = "messages" if job.messages is not None else "prompt"
            raise InvalidArgument(
                f"{where}: the base model's tokenizer cannot encode it "
                f"({type(exc).__name__}); send plain UTF-8 text"
            ) from None
        if len(ids) > self.max_prompt_tokens:
            raise PayloadTooLarge(
                f"prompt is {len(ids)} tokens, over serve.max_prompt_tokens={self.max_prompt_tokens}"
            )
        if not ids:
            raise InvalidArgument("prompt: empty after tokenisation")
        return ids

    def _known_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Token ids of the model's vocabulary (any other would index past its embeddings)."""
        vocab = self.loaded.model.get_input_embeddings().num_embeddings
        for i, token in enumerate(token_ids):
            if not 0 <= token < vocab:
                raise InvalidArgument(
                    f"prompt: token id {token} (at position {i}) is not in the model's "
                    f"vocabulary (0 to {vocab - 1})"
                )
        return list(token_ids)

    def _load(self, ref: AdapterRef) -> Any:
        """The bank's loader: a failure is the server's, reported without names (see log)."""
        try:
            return self.source.load(ref)
        except Exception:  # noqa: BLE001 - damaged files, another base model, storage down
            logger.exception("could not load adapter %s v%s", ref.id, ref.version)
            raise AdapterLoadFailed(_LOAD_FAILED) from None

    def _admit(self, job: InferenceJob, active: set[AdapterRef]) -> list[int]:
        """A job's prompt ids, once everything that could fail its batch was checked alone."""
        for ref, _ in job.mixture:
            if not isinstance(ref, AdapterRef):
                raise InvalidMixture(f"mixture: {ref!r} is not an AdapterRef")
        gone = sorted(ref for ref, _ in job.mixture if ref not in active)
        if gone:
            raise StaleMixture(f"adapter {gone[0].id!r} version {gone[0].version} is not active")
        ids = self.prompt_ids(job)
        if job.mixture:
            # Hits and misses are counted here, at each job's first look at the bank: the
            # batch then finds every adapter loaded.
            loaded = sum(ref in self.bank for ref, _ in job.mixture)
            self.adapter_hits += loaded
            self.adapter_misses += len(job.mixture) - loaded
            self.bank.check_row(job.mixture, self._load)  # weights, loading, overflow
        return ids

    def _prepare(
        self, jobs: Sequence[InferenceJob], results: list[Any]
    ) -> tuple[int, dict[int, list[int]]]:
        """Admit each job alone: the epoch they were checked at, and each one's prompt ids
        (or its error, written into ``results``)."""
        epoch = self.active.epoch  # read before refs(): the set seen is at least this new
        active = self.active.refs()
        prompts = {}
        for i, job in enumerate(jobs):
            try:
                prompts[i] = self._admit(job, active)
            except Exception as exc:  # noqa: BLE001 - this job fails, alone
                results[i] = self._row_error(exc)
        return epoch, prompts

    def _row_error(self, exc: Exception) -> AdapterSwapError:
        """The error a row carries back: ours as is, anything else without internals."""
        if isinstance(exc, InvalidAdapter | BaseModelMismatch):  # a stored adapter is bad
            logger.error("a stored adapter cannot be composed: %s", exc)
            return AdapterLoadFailed(_LOAD_FAILED)
        if isinstance(exc, AdapterSwapError):
            return exc
        logger.error("a job failed on the model replica", exc_info=exc)
        return GenerationFailed(
            "the model replica failed to run this request; the server logged the details"
        )

    # -- work ---------------------------------------------------------------------------

    def generate(
        self, jobs: Sequence[InferenceJob], on_token: TokenCallback | None = None
    ) -> list[GenerationResult | AdapterSwapError]:
        """Complete every job in one batch, each row with its own mixture.

        A job that cannot run, or that fails or is revoked while it runs, gets its error in
        its place (see the module docstring); the others are answered as if it had not been
        there. ``on_token(i, delta)`` streams job ``i``'s text.
        """
        with self._lock:
            if any(job.mixture for job in jobs):
                self.active.sync()
            results: list[Any] = [None] * len(jobs)
            admitted, prompts = self._prepare(jobs, results)
            if prompts:
                self._generate_rows(jobs, admitted, prompts, results, on_token)
            self._drop_inactive()
            return results

    def _generate_rows(
        self,
        jobs: Sequence[InferenceJob],
        admitted: int,
        prompts: dict[int, list[int]],
        results: list[Any],
        on_token: TokenCallback | None,
    ) -> None:
        """Run the admitted jobs as one batch; if it fails, one at a time (fails alone)."""
        run = list(prompts)
        stream = None if on_token is None else _Streamed(on_token)
        try:
            batch = self._run_batch(jobs, run, admitted, prompts, stream)
            for i, result in zip(run, batch, strict=True):
                results[i] = result
            return
        except Exception as exc:  # noqa: BLE001 - find the row that failed it
            if len(run) == 1:
                results[run[0]] = self._row_error(exc)
                return
            logger.warning("a batch of %d failed; running its rows one at a time", len(run))
        for i in run:
            if stream is not None:
                params = jobs[i].params
                if stream.sent(i) and params.temperature > 0 and params.seed is None:
                    # a rerun samples another text: it cannot continue what was streamed
                    results[i] = GenerationFailed(
                        "the batch this stream ran in failed after it had started; ask again"
                    )
                    continue
                stream.restart(i)
            try:
                (results[i],) = self._run_batch(jobs, [i], admitted, prompts, stream)
            except Exception as exc:  # noqa: BLE001 - this row fails, alone
                results[i] = self._row_error(exc)

    def _run_batch(
        self,
        jobs: Sequence[InferenceJob],
        run: list[int],
        admitted: int,
        prompts: dict[int, list[int]],
        on_token: TokenCallback | None,
    ) -> list[GenerationResult | AdapterSwapError]:
        mixtures = [jobs[i].mixture for i in run]
        requests = [GenerationRequest(prompts[i], jobs[i].params) for i in run]
        callback = None if on_token is None else (lambda k, d: on_token(run[k], d))
        started = time.perf_counter()
        with self.bank.mixture([list(m) for m in mixtures], self._load):
            self.last_composition_ms = 1000 * (time.perf_counter() - started)
            done = generate_batch(
                self.loaded.model,
                self.tokenizer,
                requests,
                on_token=callback,
                on_rows_kept=self.bank.keep_rows,  # finished and stopped rows leave the batch
                step_guard=self._step_guard(mixtures, admitted),
            )
        return [
            self._revoked(jobs[i]) if result.finish_reason == "abort" else result
            for i, result in zip(run, done, strict=True)
        ]

    def score(
        self, jobs: Sequence[InferenceJob], top_logprobs: int = 0
    ) -> list[PromptScores | AdapterSwapError]:
        """Per-token log-probabilities of each job's prompt under its mixture (OpenAI echo).

        One job at a time: ``score_prompts`` regroups prompts into forwards by length, which
        would not keep a per-row mixture aligned with its row. A job whose mixture was revoked
        during its forward gets a StaleMixture, not the scores.
        """
        with self._lock:
            if any(job.mixture for job in jobs):
                self.active.sync()
            results: list[Any] = [None] * len(jobs)
            admitted, prompts = self._prepare(jobs, results)
            for i, ids in prompts.items():
                try:
                    with self.bank.mixture([list(jobs[i].mixture)], self._load):
                        (scores,) = score_prompts(
                            self.loaded.model, self.tokenizer, [ids], top_logprobs=top_logprobs
                        )
                    with self._step:  # like a decode step: a sync waits for this check
                        revoked = self.active.epoch != admitted and self._gone([jobs[i].mixture])
                        results[i] = self._revoked(jobs[i]) if revoked else scores
                except Exception as exc:  # noqa: BLE001 - this job fails, alone
                    results[i] = self._row_error(exc)
            self._drop_inactive()
            return results


def _check_text(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{where}: not valid Unicode text (a lone surrogate at character {exc.start}); "
            "send UTF-8 text"
        ) from None


class _Streamed:
    """Text streamed so far per job, so that rerunning a job (its batch failed) streams only
    what it had not streamed yet. Only greedy and seeded requests are rerun once streaming:
    their rerun produces the same text."""

    def __init__(self, on_token: TokenCallback) -> None:
        self._on_token = on_token
        self._sent: dict[int, int] = defaultdict(int)  # characters streamed to the caller
        self._seen: dict[int, int] = defaultdict(int)  # characters produced by this run

    def __call__(self, index: int, delta: str) -> None:
        start = self._seen[index]
        self._seen[index] += len(delta)
        new = delta[max(0, self._sent[index] - start) :]
        if new:
            self._sent[index] += len(new)
            self._on_token(index, new)

    def sent(self, index: int) -> bool:
        """Whether any of job ``index``'s text reached the caller."""
        return self._sent[index] > 0

    def restart(self, index: int) -> None:
        self._seen[index] = 0
