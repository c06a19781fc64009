"""The demo's report: ``report.md`` and two PNG plots, from the demo's result data.

The plots are plain ``Figure`` objects (no pyplot state, no backend to choose); every value
they draw is labelled with its number, so a recalled fact's NLL of 0 reads as 0, not as a gap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def write_report(directory: Path, result: dict[str, Any]) -> Path:
    """Write ``report.md``, ``recall.png``, ``forget.png`` and ``result.json``; returns the md."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    recall_figure(result).savefig(directory / "recall.png", dpi=120)
    forget_figure(result).savefig(directory / "forget.png", dpi=120)
    path = directory / "report.md"
    path.write_text(_markdown(result))
    return path


def _markdown(result: dict[str, Any]) -> str:
    users = result["users"]
    lines = [
        "# AdapterSwap demo report",
        "",
        f"Home: `{result['home']}`. Run time: {result['seconds']} s.",
        "",
        "## Who recalls what",
        "",
        "Each fact's sentence is completed greedily by the served model for each user; the fact's "
        "NLL (nats/token) is read from `echo` log-probabilities.",
        "",
        "| fact | " + " | ".join(f"{u} ({', '.join(g)})" for u, g in users.items()) + " |",
        "|---|" + "---|" * len(users),
    ]
    for i, first in enumerate(next(iter(result["recall"].values()))):
        cells = []
        for user in users:
            r = result["recall"][user][i]
            mark = "recalls" if r["recalled"] else "does not recall"
            cells.append(f"{mark}, NLL {r['answer_nll']:.2f}, {', '.join(r['adapters']) or 'base'}")
        lines.append(f"| {first['doc_id']} | " + " | ".join(cells) + " |")
    deleted = result["deleted"]
    forget = deleted["verify_forget"]
    lines += [
        "",
        "![recall](recall.png)",
        "",
        f"## Deleting {deleted['doc_id']}",
        "",
        f"- its fact: NLL {deleted['before']['answer_nll']:.2f} before, "
        f"{deleted['after']['answer_nll']:.2f} after",
        f"- a fact kept in the same shard ({deleted['kept_before']['doc_id']}): NLL "
        f"{deleted['kept_before']['answer_nll']:.2f} before, "
        f"{deleted['kept_after']['answer_nll']:.2f} after",
        f"- verify-forget: {'PASS' if forget['passed'] else 'FAIL'}, the deleted document's NLL "
        f"{forget['deleted_nll']:.2f} sits at percentile {forget['percentile']:.0f} of "
        f"{len(forget['control_nlls'])} never-ingested controls (before the delete: "
        f"{deleted['verify_forget_before']['deleted_nll']:.2f}, percentile "
        f"{deleted['verify_forget_before']['percentile']:.0f})",
        "",
        "![forget](forget.png)",
        "",
        "## A second batch",
        "",
        f"New shards: {', '.join(result['batch2']['shards'])}. Batch-1 answers unchanged: "
        f"{sum(result['batch2']['unchanged'])}/{len(result['batch2']['unchanged'])}.",
        "",
    ]
    return "\n".join(lines)


def recall_figure(result: dict[str, Any]) -> Figure:
    """Each fact's NLL for each user, every bar labelled with its value."""
    users = list(result["users"])
    facts = [r["doc_id"] for r in result["recall"][users[0]]]
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    width = 0.8 / len(users)
    top = max(r["answer_nll"] for rs in result["recall"].values() for r in rs)
    for k, user in enumerate(users):
        values = [r["answer_nll"] for r in result["recall"][user]]
        # The edge draws a recalled fact (NLL ~0) as a line on the baseline, not as nothing.
        bars = ax.bar(
            [i + k * width for i in range(len(facts))],
            values,
            width,
            label=user,
            edgecolor="black",
            linewidth=0.8,
        )
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)
    # Below zero, so a zero bar's line stands clear of the axis; above, room for the labels.
    ax.set_ylim(-0.03 * (top or 1), 1.2 * (top or 1))
    ax.set_xticks([i + width * (len(users) - 1) / 2 for i in range(len(facts))], facts)
    ax.set_ylabel("fact NLL (nats/token)")
    ax.set_title("Recall by user: lower is better known")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def forget_figure(result: dict[str, Any]) -> Figure:
    """The deleted document's NLL, trained and after deletion, among never-ingested controls;
    its two points labelled with their value and percentile."""
    before = result["deleted"]["verify_forget_before"]
    after = result["deleted"]["verify_forget"]
    fig = Figure(figsize=(6, 2.6))
    ax = fig.subplots()
    ax.scatter(after["control_nlls"], [0] * len(after["control_nlls"]), label="never ingested")
    for point, marker, label in (
        (before, "x", "the document, trained"),
        (after, "X", "after its deletion"),
    ):
        nll = point["deleted_nll"]
        ax.scatter([nll], [0], marker=marker, s=120, label=label)
        ax.annotate(
            f"{nll:.2f} (p{point['percentile']:.0f})",
            (nll, 0),
            textcoords="offset points",
            xytext=(0, 10),
            ha="center",
            fontsize=7,
        )
    ax.set_yticks([])
    ax.set_ylim(-1, 1.6)
    ax.set_xlabel("document NLL (nats/token) for a holder of its group")
    ax.set_title(f"verify-forget: {after['doc_id']} among never-ingested controls")
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
