"""Training one shard's LoRA adapter on the frozen base model. No Ray here.

The loop is the same wherever it runs: in a Ray Train worker (``actors.train_pool``,
``actors.train_launcher``), in a plain process (benchmarks, the chronological baseline) or
in a test.

- Data: the shard's documents, each followed by EOS, concatenated and cut into blocks of
  ``training.seq_len`` tokens (packing; a document longer than a block spans several). The
  last partial block is padded and its padding is masked out of the loss.
- Loss: causal-LM cross-entropy over every real token, plus ``kl_weight`` times
  KL(base ‖ adapter) of the next-token distributions at those tokens, the base model's
  computed with the adapter switched off (a regulariser toward the base model; off by default).
- Model: peft LoRA on ``lora.target_modules`` (every attention and MLP linear by default).
- Optimiser: AdamW, linear warm-up then cosine decay, ``max_steps`` optimiser steps of
  ``grad_accum_steps`` micro-batches of ``batch_size`` blocks each.
- Determinism: one seed per shard (derived from ``training.seed`` and the shard id) drives
  the LoRA init, the block order and LoRA dropout's masks (a random stream of the trainer's
  own, checkpointed with it), so retraining the same data gives the same adapter, whatever
  the process trained before.
- With several data-parallel workers, rank r takes blocks r, r+W, r+2W, ...
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from adapterswap.config import LoraSettings, TrainingSettings

IGNORE_INDEX = -100
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "lora_weights.safetensors"


@dataclass(frozen=True)
class PackedBlocks:
    """Token blocks for causal-LM training. All tensors are (n_blocks, seq_len)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class StepInfo:
    """What one optimiser step did."""

    step: int
    max_steps: int
    loss: float
    tokens: int
    tokens_per_s: float
    learning_rate: float


def shard_seed(base_seed: int, adapter_id: str) -> int:
    """The shard's own seed: stable across runs and machines, distinct across shards."""
    digest = hashlib.sha256(f"{base_seed}:{adapter_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def budget_steps(training: TrainingSettings, n_blocks: int) -> int:
    """Optimiser steps for a run: ``max_steps``, or ``epochs`` passes over ``n_blocks`` blocks."""
    if training.epochs is None:
        return training.max_steps
    per_step = min(training.batch_size, n_blocks) * training.grad_accum_steps
    return max(1, math.ceil(training.epochs * n_blocks / per_step))


def build_lora_config(lora: LoraSettings) -> LoraConfig:
    """peft's LoraConfig from our settings: the one place the two meet."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def pack_documents(tokenizer: Any, texts: Sequence[str], seq_len: int) -> PackedBlocks:
    """Tokenise, join with EOS and cut into (n, seq_len) blocks; padding is masked from the loss."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    if len(stream) % seq_len == 1 and len(stream) > 1:
        # A last block holding one token has nothing to predict (0/0 loss): drop that final EOS.
        stream.pop()
    n_blocks = max(1, math.ceil(len(stream) / seq_len))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((n_blocks * seq_len,), pad, dtype=torch.long)
    ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    mask = torch.zeros(n_blocks * seq_len, dtype=torch.long)
    mask[: len(stream)] = 1
    ids, mask = ids.view(n_blocks, seq_len), mask.view(n_blocks, seq_len)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return PackedBlocks(ids, mask, labels)


class ShardTrainer:
    """Trains a LoRA adapter on one shard's packed blocks, one optimiser step at a time.

    ``wrap`` lets a caller wrap the peft model for data parallelism (Ray Train's
    ``prepare_model``); the unwrapped model stays at ``self.model``.
    """

    def __init__(
        self,
        base_model: Any,
        blocks: PackedBlocks,
        lora: LoraSettings,
        training: TrainingSettings,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.training = training
        self.device = next(base_model.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model: PeftModel = get_peft_model(base_model, build_lora_config(lora))
            # LoRA dropout's masks (on CPU) come from this stream, swapped in around each
            # step: the adapter depends on the shard's seed, not on what the process ran
            # before (a pool worker trains shard after shard). A GPU's dropout draws from
            # its own generator, which this does not cover.
            self._rng_state = torch.get_rng_state()
        self.module = wrap(self.model) if wrap else self.model
        self.blocks = _take_rank(blocks, rank, world_size)
        self.generator = torch.Generator().manual_seed(seed + rank)
        self._start_schedule()
        self.tokens_seen = 0
        self.last: StepInfo | None = None

    def _start_schedule(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_steps = budget_steps(self.training, len(self.blocks))
        lr, steps = self.training.learning_rate, self.max_steps
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warmup = int(self.training.warmup_ratio * steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, steps)
        self.step_count = 0
        self._order: list[int] = []

    def continue_on(self, blocks: PackedBlocks) -> None:
        """Keep this adapter and fine-tune it further on new blocks, with a fresh schedule.

        This is the ``chronological`` baseline's step (benchmarks only): one adapter that
        keeps learning batch after batch, which is what AdapterSwap avoids.
        """
        self.blocks = blocks
        self._start_schedule()

    @property
    def done(self) -> bool:
        return self.step_count >= self.max_steps

    def _next_indices(self, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if not self._order:  # a new epoch over the blocks, in a seeded order
                self._order = torch.randperm(len(self.blocks), generator=self.generator).tolist()
            picked.append(self._order.pop())
        return picked

    def step(self) -> StepInfo:
        """One optimiser step over ``grad_accum_steps`` micro-batches; returns its metrics."""
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            total_loss, tokens = self._accumulate()
            self._rng_state = torch.get_rng_state()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.tokens_seen += tokens
        seconds = max(time.perf_counter() - started, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        self.last = StepInfo(
            self.step_count, self.max_steps, total_loss, tokens, tokens / seconds, lr
        )
        return self.last

    def _accumulate(self) -> tuple[float, int]:
        """Forward and backward over ``grad_accum_steps`` micro-batches: (mean loss, tokens)."""
        self.module.train()
        accum, total_loss, tokens = self.training.grad_accum_steps, 0.0, 0
        for _ in range(accum):
            index = torch.tensor(
                self._next_indices(min(self.training.batch_size, len(self.blocks)))
            )
            batch = {
                k: getattr(self.blocks, k)[index].to(self.device)
                for k in ("input_ids", "attention_mask", "labels")
            }
            loss = self._loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {self.step_count + 1}"
                )
            (loss / accum).backward()
            total_loss += loss.item() / accum
            tokens += int(batch["attention_mask"].sum())
        return total_loss, tokens

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy, plus ``kl_weight`` · KL(base ‖ adapter) when that is on."""
        out = self.module(**batch)
        if not self.training.kl_weight:
            return out.loss
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad(), self.model.disable_adapter():
            base = self.model(**inputs).logits
        kl = base_kl(base, out.logits, batch["labels"])
        return out.loss + self.training.kl_weight * kl

    def save_checkpoint(self, directory: Path) -> None:
        """Everything needed to resume exactly: LoRA weights, optimiser, schedule, data order."""
        save_file(get_peft_model_state_dict(self.model), str(directory / WEIGHTS_FILE))
        state = {
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "order": list(self._order),
            "generator": self.generator.get_state(),
            "rng": self._rng_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, directory / STATE_FILE)

    def load_checkpoint(self, directory: Path) -> None:
        """Resume from :meth:`save_checkpoint`'s files (loaded without pickle code execution)."""
        set_peft_model_state_dict(
            self.model, load_file(str(directory / WEIGHTS_FILE), device=str(self.device))
        )
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.step_count = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self._order = list(state["order"])
        self.generator.set_state(state["generator"])
        if "rng" in state:  # checkpoints written before dropout had its own stream lack it
            self._rng_state = state["rng"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def base_kl(base_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(base ‖ adapter) of the next-token distributions at the positions that predict a
    label (the ones the cross-entropy counts). Logits ``(B, T, V)``, labels ``(B, T)``."""
    mask = (labels[:, 1:] != IGNORE_INDEX).reshape(-1)
    vocab = logits.shape[-1]
    base = torch.log_softmax(base_logits[:, :-1].reshape(-1, vocab)[mask].float(), dim=-1)
    ours = torch.log_softmax(logits[:, :-1].reshape(-1, vocab)[mask].float(), dim=-1)
    return torch.nn.functional.kl_div(ours, base, log_target=True, reduction="batchmean")


def _take_rank(blocks: PackedBlocks, rank: int, world_size: int) -> PackedBlocks:
    if world_size == 1:
        return blocks
    index = torch.arange(rank, len(blocks), world_size)
    if len(index) == 0:  # fewer blocks than workers: every rank still needs data
        index = torch.tensor([rank % len(blocks)])
    return PackedBlocks(blocks.input_ids[index], blocks.attention_mask[index], blocks.labels[index])


@torch.no_grad()
def mean_token_nll(model: Any, tokenizer: Any, text: str) -> float:
    """Mean negative log-likelihood per token of ``text`` under ``model`` (nats)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    model.eval()
    return float(model(input_ids=ids, labels=ids).loss)
