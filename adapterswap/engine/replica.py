"""A model replica: one frozen base model, an adapter bank, and the serving engine that runs
every request on them. No Ray here.

The Ray Serve model deployment wraps this class; tests drive it directly. Requests are
checked here, in the caller's thread (mixture refs, the active set, tokenisation and the
prompt limits), then queue for the replica's :class:`~adapterswap.engine.loop.Engine`, which
schedules every step: rows join and leave each iteration, each with its own adapter mixture.
A queued request's adapters are prefetched from storage into the host tier meanwhile
(:class:`~adapterswap.engine.adapter_tiers.AdapterTiers`); a load that fails fails only the
requests that need it, and the replica reports it to operators (:meth:`ModelReplica.report`,
sent with the epoch watcher's heartbeat).

Removal: no token is produced with a revoked version after the acknowledgement.

- Before a request with adapters is queued the replica syncs with the store's epoch (a
  cheap read when nothing changed) and refuses a job naming a version its view no longer
  holds (``StaleMixture``: the gateway routes it again).
- Every step's sampling and streaming run under the replica's step lock, after the engine
  compares the active set's epoch with the one it last checked (one integer). When it
  moved, every row whose mixture holds a version that left the set stops at once and gets
  a ``StaleMixture``: a stream ends with an ``adapter_revoked`` error event, a
  non-streaming request is routed again and rerun from the start. A scoring row is checked
  the same way before its result is returned.
- Applying a new set drops every version that left it from both tiers (the host tier's copy
  zeroed, as the bank's slot is); a prefetch of one still loading is discarded when it
  finishes, and an install checks the set again, so it is never installed.
- :meth:`ModelReplica.sync`, whose epoch the watcher acknowledges, applies the new set and
  then takes the step lock once: a step that was sampling finishes first, and every later
  step sees the new epoch. So the acknowledgement never waits for a forward or an adapter
  load, and no token is sampled with a revoked version after it.

Failures are per row: a job that cannot run gets its error in its place, and the others
are answered as if it had not been there. A row's error is one of: ``StaleMixture``,
``PayloadTooLarge``, ``InvalidArgument``, ``InvalidMixture``, ``SlotsExhausted``,
``Overloaded`` (the queue is full), :class:`AdapterLoadFailed`, :class:`GenerationFailed`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterswap.compose.bank import AdapterBank
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.engine.adapter_tiers import LOAD_FAILED, AdapterTiers
from adapterswap.engine.generation import TokenCallback
from adapterswap.engine.host_cache import HostCache
from adapterswap.engine.loop import Engine, Work
from adapterswap.engine.requests import (
    GenerationRequest,
    GenerationResult,
    PromptScores,
    SamplingParams,
)
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
from adapterswap.route.active_set import ActiveSet, Changes, Snapshot
from adapterswap.storage.layout import StorageLayout
from adapterswap.types import AdapterRef, Mixture

logger = logging.getLogger("adapterswap.replica")


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
        changes: Changes | None = None,
    ) -> None:
        """``snapshot``, ``epoch`` and ``changes`` read the store (see :class:`ActiveSet`)."""
        self.loaded = loaded or load_base_model(config.model, config.model_cache_dir)
        self.tokenizer = self.loaded.tokenizer
        self.bank = AdapterBank.from_settings(self.loaded.model, config.lora, config.serve)
        base_hash = hash_base_model(config.model, config.model_cache_dir)
        self.source = StorageAdapterSource(StorageLayout.from_config(config), base_hash)
        serve = config.serve
        self.tiers = AdapterTiers(
            self.bank,
            HostCache(serve.host_cache_bytes),
            self.source,
            workers=serve.prefetch_workers,
            retry_s=serve.adapter_retry_s,
            pin_memory=next(self.loaded.model.parameters()).is_cuda,
        )
        self.active = ActiveSet(snapshot, self._drop, epoch, changes)
        self.max_prompt_tokens = config.serve.max_prompt_tokens
        self.adapter_hits = self.adapter_misses = 0  # jobs' adapters found loaded, or not
        # Held while a step samples and streams: a sync waits for that, never for a forward.
        self._step = threading.Lock()
        context = _context(self.loaded.model.config, serve.max_prompt_tokens + serve.max_new_tokens)
        # The engine's loop thread may outlive a step of this replica's life: it calls back
        # through weak references, so a replica nobody uses is freed at once.
        self.engine = Engine(
            self.loaded.model,
            self.tokenizer,
            bank=self.bank,
            tiers=self.tiers,
            max_rows=serve.max_batch_size,
            max_queue=serve.max_queued_requests,
            prefill_tokens=serve.prefill_chunk_tokens,
            kv_tokens=serve.kv_cache_tokens or serve.max_batch_size * context,
            max_context=context,
            step_lock=self._step,
            epoch=_weakly(self._epoch),
            revoked=_weakly(self._gone),
            background=True,
        )

    def close(self) -> None:
        """Stop the engine and the prefetch pool for good (what is queued or running is
        dropped)."""
        self.engine.stop()
        self.tiers.close()

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def _drop(self, keep: set[AdapterRef]) -> list[AdapterRef]:
        return self.tiers.drop(keep)

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

    def _epoch(self) -> int:
        return self.active.epoch

    def _gone(self, mixtures: Sequence[Mixture]) -> list[int]:
        """Indices of the mixtures holding a version that is not in the active set."""
        active = self.active.refs()
        return [k for k, mixture in enumerate(mixtures) if any(r not in active for r, _ in mixture)]

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

    def report(self) -> dict[str, Any]:
        """What this replica tells operators with its heartbeat (``adapterswap status``, for
        admins): the versions whose last load failed, and why."""
        return {"failed_loads": [failure.report() for failure in self.tiers.failures()]}

    def _admit(self, job: InferenceJob) -> list[int]:
        """A job's prompt ids, once everything that can be checked before it queues was."""
        for ref, _ in job.mixture:
            if not isinstance(ref, AdapterRef):
                raise InvalidMixture(f"mixture: {ref!r} is not an AdapterRef")
        if job.mixture:
            self.active.sync()
            active = self.active.refs()
            gone = sorted(ref for ref, _ in job.mixture if ref not in active)
            if gone:
                raise StaleMixture(
                    f"adapter {gone[0].id!r} version {gone[0].version} is not active"
                )
        ids = self.prompt_ids(job)
        if job.mixture:
            loaded = sum(ref in self.bank for ref, _ in job.mixture)
            self.adapter_hits += loaded
            self.adapter_misses += len(job.mixture) - loaded
        return ids

    def _row_error(self, exc: Exception) -> AdapterSwapError:
        """The error a row carries back: ours as is, anything else without internals."""
        if isinstance(exc, InvalidAdapter | BaseModelMismatch):  # a stored adapter is bad
            logger.error("a stored adapter cannot be composed: %s", exc)
            return AdapterLoadFailed(LOAD_FAILED)
        if isinstance(exc, AdapterSwapError):
            return exc
        logger.error("a job failed on the model replica", exc_info=exc)
        return GenerationFailed(
            "the model replica failed to run this request; the server logged the details"
        )

    # -- work ---------------------------------------------------------------------------

    def submit(
        self,
        job: InferenceJob,
        on_done: Callable[[Any], None],
        *,
        on_token: Callable[[str], None] | None = None,
        score: int | None = None,
    ) -> Work | None:
        """Queue one job for the engine; ``on_done`` gets its result or its error, once.

        ``score=k`` scores the prompt (``PromptScores``, top ``k`` per token) instead of
        generating. A job that cannot run is answered at once (and None returned); otherwise
        the returned :class:`Work` can be cancelled (its client went away).
        """

        def done(outcome: Any) -> None:
            if isinstance(outcome, GenerationResult) and outcome.finish_reason == "abort":
                self._drop_inactive()
                outcome = self._revoked(job)
            elif isinstance(outcome, BaseException):
                outcome = self._row_error(outcome)
            on_done(outcome)

        try:
            ids = self._admit(job)
            request = None if score is not None else GenerationRequest(ids, job.params)
            work = Work(ids, request, list(job.mixture), done, on_token, top_logprobs=score or 0)
            return self.engine.submit(work)
        except Exception as exc:  # noqa: BLE001 - this job fails, alone
            done(exc)
            return None

    def generate(
        self, jobs: Sequence[InferenceJob], on_token: TokenCallback | None = None
    ) -> list[GenerationResult | AdapterSwapError]:
        """Complete every job (they run together), each row with its own mixture; blocks.

        A job that cannot run, or that fails or is revoked while it runs, gets its error in
        its place (see the module docstring). ``on_token(i, delta)`` streams job ``i``'s text.
        """
        return self._wait(jobs, None, on_token)

    def score(
        self, jobs: Sequence[InferenceJob], top_logprobs: int = 0
    ) -> list[PromptScores | AdapterSwapError]:
        """Per-token log-probabilities of each job's prompt under its mixture (OpenAI echo)."""
        return self._wait(jobs, top_logprobs, None)

    def _wait(
        self, jobs: Sequence[InferenceJob], score: int | None, on_token: TokenCallback | None
    ) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        finished = [threading.Event() for _ in jobs]
        for i, job in enumerate(jobs):

            def done(outcome: Any, i: int = i) -> None:
                results[i] = outcome
                finished[i].set()

            stream = None if on_token is None else (lambda delta, i=i: on_token(i, delta))
            self.submit(job, done, on_token=stream, score=score)
        for event in finished:
            event.wait()
        return results


def _weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, calling through a weak reference to its object."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:
            raise RuntimeError("the model replica is gone")
        return bound(*args)

    return call


def _context(model_config: Any, served: int) -> int:
    """Tokens one row may hold: prompt + max_tokens as served, within the model's positions."""
    positions = getattr(model_config, "max_position_embeddings", None)
    return min(served, positions) if positions else served


def _check_text(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{where}: not valid Unicode text (a lone surrogate at character {exc.start}); "
            "send UTF-8 text"
        ) from None
