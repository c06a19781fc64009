"""A model replica: one frozen base model, an adapter bank, generation and scoring. No Ray here.

The Ray Serve model deployment wraps this class; tests drive it directly. A replica serves a
batch of jobs, each with its own adapter mixture, in one forward per step:
``with bank.mixture(rows): generate_batch(...)``. Before every batch it syncs with the store's
epoch (a cheap read when nothing changed), so a revoked version is evicted before the replica
acknowledges the epoch that revoked it, and a job naming a version that is not active in
its view is refused rather than served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterswap.active_set import ActiveSet, Snapshot
from adapterswap.adapter_source import StorageAdapterSource
from adapterswap.base_model import LoadedModel, hash_base_model, load_base_model
from adapterswap.compose import AdapterBank
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import AdapterSwapError, InvalidArgument, PayloadTooLarge, StaleMixture
from adapterswap.generation import (
    GenerationRequest,
    GenerationResult,
    PromptScores,
    SamplingParams,
    TokenCallback,
    apply_chat_template,
    generate_batch,
    score_prompts,
)
from adapterswap.registry import AdapterRef

Mixture = tuple[tuple[AdapterRef, float], ...]


@dataclass(frozen=True)
class InferenceJob:
    """One request's work for a model replica: a prompt or a chat, sampling, its mixture.

    The replica tokenises (the ingress holds no tokenizer), so the prompt-length limit is
    enforced here: over ``serve.max_prompt_tokens`` is a PayloadTooLarge (HTTP 413).
    """

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
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
        self.source = StorageAdapterSource(config.storage, base_hash)
        self.active = ActiveSet(snapshot, self._drop, epoch)
        self.max_prompt_tokens = config.serve.max_prompt_tokens
        self.last_composition_ms = 0.0  # mixture setup of the latest batch (a metric)
        self._lock = threading.Lock()  # the bank holds one mixture at a time

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def _drop(self, keep: set[AdapterRef]) -> list[AdapterRef]:
        self.source.forget(keep)
        return self.bank.evict_all_except(keep)

    def sync(self) -> int:
        """Catch up with the store's epoch; returns the epoch now acknowledged."""
        return self.active.sync().epoch

    def prompt_ids(self, job: InferenceJob) -> list[int]:
        """Tokenise a job: the chat template for messages, the plain prompt otherwise."""
        if job.messages is not None:
            ids = apply_chat_template(self.tokenizer, list(job.messages))
        else:
            ids = self.tokenizer(job.prompt or "", add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise PayloadTooLarge(
                f"prompt is {len(ids)} tokens, over serve.max_prompt_tokens={self.max_prompt_tokens}"
            )
        if not ids:
            raise InvalidArgument("prompt: empty after tokenisation")
        return ids

    def _refusals(self, jobs: Sequence[InferenceJob]) -> list[AdapterSwapError | None]:
        """Per job, why it cannot run here (None: it can), after syncing with the store.

        A job whose mixture names a version this replica no longer serves (revoked after the
        ingress routed it) is a StaleMixture; a bad prompt is its own error. Either fails
        that job only, never the batch it shares with others.
        """
        if any(job.mixture for job in jobs):
            self.sync()
        active = self.active.refs()
        refusals: list[AdapterSwapError | None] = []
        for job in jobs:
            gone = sorted(ref for ref, _ in job.mixture if ref not in active)
            if gone:
                refusals.append(
                    StaleMixture(f"adapter {gone[0].id!r} version {gone[0].version} is not active")
                )
                continue
            try:
                self.prompt_ids(job)
                refusals.append(None)
            except AdapterSwapError as exc:
                refusals.append(exc)
        return refusals

    def generate(
        self, jobs: Sequence[InferenceJob], on_token: TokenCallback | None = None
    ) -> list[GenerationResult | AdapterSwapError]:
        """Complete every job in one batch, each row with its own mixture.

        A job that cannot run gets its error in its place (see :meth:`_refusals`).
        """
        with self._lock:
            results: list[Any] = list(self._refusals(jobs))  # each None becomes a result
            run = [i for i, refusal in enumerate(results) if refusal is None]
            if not run:
                return results
            requests = [GenerationRequest(self.prompt_ids(jobs[i]), jobs[i].params) for i in run]
            callback = None if on_token is None else (lambda k, d: on_token(run[k], d))
            started = time.perf_counter()
            with self.bank.mixture([list(jobs[i].mixture) for i in run], self.source.load):
                self.last_composition_ms = 1000 * (time.perf_counter() - started)
                done = generate_batch(
                    self.loaded.model, self.tokenizer, requests, on_token=callback
                )
            for i, result in zip(run, done, strict=True):
                results[i] = result
            return results

    def score(
        self, jobs: Sequence[InferenceJob], top_logprobs: int = 0
    ) -> list[PromptScores | AdapterSwapError]:
        """Per-token log-probabilities of each job's prompt under its mixture (OpenAI echo).

        One job at a time: ``score_prompts`` regroups prompts into forwards by length, which
        would not keep a per-row mixture aligned with its row.
        """
        scores: list[PromptScores | AdapterSwapError] = []
        with self._lock:
            for job, refusal in zip(jobs, self._refusals(jobs), strict=True):
                if refusal is not None:
                    scores.append(refusal)
                    continue
                with self.bank.mixture([list(job.mixture)], self.source.load):
                    scores += score_prompts(
                        self.loaded.model,
                        self.tokenizer,
                        [self.prompt_ids(job)],
                        top_logprobs=top_logprobs,
                    )
        return scores
