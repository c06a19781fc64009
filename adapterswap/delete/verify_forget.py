"""``verify-forget``: is a deleted document now as unknown as documents never ingested?

The measure is the served model's mean per-token NLL of a text, for a caller who holds the
document's group (``POST /v1/completions`` with ``echo``, ``logprobs: 0``, ``max_tokens: 0``
and ``groups: [group]``, so routing is as that caller's would be). The deleted document's
NLL is placed among the same measure on controls: documents of the same group that were
never ingested (the operator gives them). A document still memorised sits far below every
control; a forgotten one sits inside their distribution.

Pass rule: at least one control has a lower NLL than the deleted document (its percentile
among the controls is above 0). With N controls a memorised document fails with certainty,
and a forgotten one passes unless it happens to be the easiest text of N + 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adapterswap.errors import InvalidArgument

Scorer = Callable[[Sequence[str], str], list[float]]  # (texts, group) -> mean NLL per text


@dataclass(frozen=True)
class ForgetReport:
    doc_id: str
    group: str
    deleted_nll: float
    control_nlls: list[float]
    percentile: float  # % of controls with a lower NLL than the deleted document
    passed: bool

    def summary(self) -> str:
        controls = sorted(self.control_nlls)
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}: {self.doc_id} ({self.group}) NLL {self.deleted_nll:.3f} nats/token sits "
            f"at percentile {self.percentile:.0f} of {len(controls)} never-ingested controls "
            f"(NLL {controls[0]:.3f} .. {controls[-1]:.3f})"
        )


def mean_nll(token_logprobs: Sequence[float | None]) -> float:
    """Mean NLL of an echoed prompt's tokens (the first has no log-probability)."""
    values = [-lp for lp in token_logprobs if lp is not None]
    if not values:
        raise InvalidArgument("text: too short to score (needs two tokens or more)")
    return sum(values) / len(values)


def verify_forget(
    doc_id: str, group: str, text: str, controls: Sequence[str], score: Scorer
) -> ForgetReport:
    """Score the deleted ``text`` and the ``controls`` as a holder of ``group``; see the rule."""
    if not controls:
        raise InvalidArgument("controls: give at least one never-ingested document")
    deleted, *others = score([text, *controls], group)
    if not all(math.isfinite(x) for x in (deleted, *others)):
        raise InvalidArgument("scores: the model returned a non-finite NLL")
    below = sum(1 for nll in others if nll < deleted)
    percentile = 100.0 * below / len(others)
    return ForgetReport(doc_id, group, deleted, list(others), percentile, below > 0)


def http_scorer(client: Any) -> Scorer:
    """Score through the HTTP API with an ``adapterswap.Client`` whose key holds the group."""

    def score(texts: Sequence[str], group: str) -> list[float]:
        nlls = []
        for text in texts:
            answer = client.completions(
                text, max_tokens=0, echo=True, logprobs=0, temperature=0, groups=[group]
            )
            nlls.append(mean_nll(answer["choices"][0]["logprobs"]["token_logprobs"]))
        return nlls

    return score
