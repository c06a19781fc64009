"""The demo's report: ``report.md`` and two PNG plots, from the demo's result data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(directory: Path, result: dict[str, Any]) -> Path:
    """Write ``report.md``, ``recall.png``, ``forget.png`` and ``result.json``; returns the md."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    _recall_plot(directory / "recall.png", result)
    _forget_plot(directory / "forget.png", result)
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


def _recall_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = list(result["users"])
    facts = [r["doc_id"] for r in result["recall"][users[0]]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(users)
    for k, user in enumerate(users):
        values = [r["answer_nll"] for r in result["recall"][user]]
        ax.bar([i + k * width for i in range(len(facts))], values, width, label=user)
    ax.set_xticks([i + width * (len(users) - 1) / 2 for i in range(len(facts))], facts)
    ax.set_ylabel("fact NLL (nats/token)")
    ax.set_title("Recall by user: lower is better known")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _forget_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = result["deleted"]["verify_forget_before"]
    after = result["deleted"]["verify_forget"]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.scatter(after["control_nlls"], [0] * len(after["control_nlls"]), label="never ingested")
    ax.scatter([before["deleted_nll"]], [0], marker="x", s=120, label="the document, trained")
    ax.scatter([after["deleted_nll"]], [0], marker="X", s=120, label="after its deletion")
    ax.set_yticks([])
    ax.set_ylim(-1, 1.6)
    ax.set_xlabel("document NLL (nats/token) for a holder of its group")
    ax.set_title(f"verify-forget: {after['doc_id']} among never-ingested controls")
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
