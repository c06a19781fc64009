"""(e) Serving: the serving issue's ratios as one table, from the serving benchmarks' results.

    python benchmarks/eval_serving.py [--results benchmarks/results]

Reads what ``serve_throughput.py`` (HTTP through Ray Serve), ``compose_overhead.py`` (the
model in process) and ``deletion_cost.py`` (revocation latency) last wrote; run those first
to refresh the numbers. Each row is a ratio or latency measured side by side in one run, its
goal, and whether it was met. Prints the table as markdown.

Writes results/serving.{json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import RESULTS, write_result
from _plots import bar_chart

SOURCES = ("serve_throughput", "compose_overhead", "deletion_cost")


def read_sources(results: Path) -> dict[str, dict[str, Any]]:
    missing = [name for name in SOURCES if not (results / f"{name}.json").exists()]
    if missing:
        raise SystemExit(
            f"{results}: no {', '.join(m + '.json' for m in missing)}; run "
            + " and ".join(f"benchmarks/{m}.py" for m in missing)
            + " first"
        )
    return {name: json.loads((results / f"{name}.json").read_text()) for name in SOURCES}


def rows(src: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """(measure, value, unit, goal, met) per serving goal."""
    serve, compose, delete = (src[name] for name in SOURCES)
    b1 = compose["results"]["b1_composed_k3"]
    b8 = compose["results"]["b8_composed_8_distinct_pool8"]
    revocation = delete["revocation"]["acknowledged_after_s"]
    table = [
        (
            "server: ours / plain-peft server, completion tok/s",
            serve["ours_vs_peft_throughput"],
            "x",
            "≥ 3",
            serve["ours_vs_peft_throughput"] >= 3,
        ),
        ("server: 8 distinct mixtures / base, time", serve["composed_vs_base"], "x", "—", None),
        (
            "in process, batch 1, k=3: composed / FLOP floor",
            b1["vs_floor"],
            "x",
            "≤ 1.05",
            b1["vs_floor"] <= 1.05,
        ),
        (
            "in process, batch 8, 8 distinct mixtures / FLOP floor",
            b8["vs_floor"],
            "x",
            "≤ 1.10",
            b8["vs_floor"] <= 1.10,
        ),
        (
            "in process, batch 8, 8 distinct mixtures / memory floor",
            b8["vs_base"] / b8["memory_floor"],
            "x",
            "—",
            None,
        ),
        (
            "cold adapter load, median",
            sorted(compose["cold_load_ms"])[len(compose["cold_load_ms"]) // 2],
            "ms",
            "≤ 50",
            sorted(compose["cold_load_ms"])[len(compose["cold_load_ms"]) // 2] <= 50,
        ),
        (
            "revocation acknowledged by every replica, p99",
            revocation["p99"] * 1000,
            "ms",
            "—",
            None,
        ),
    ]
    return [
        dict(zip(("measure", "value", "unit", "goal", "met"), row, strict=True)) for row in table
    ]


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| measure | value | goal | met |", "|---|---|---|---|"]
    for r in table:
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['measure']} | {r['value']:.3g} {r['unit']} | {r['goal']} | {met} |")
    return "\n".join(lines)


def run(results: Path, out: Path) -> dict[str, Any]:
    src = read_sources(results)
    table = rows(src)
    print(markdown(table))
    serve = src["serve_throughput"]
    payload = {
        "sources": {
            name: {"date": s.get("date"), "machine": s.get("machine")} for name, s in src.items()
        },
        "table": table,
        "completion_tokens_per_s": serve["completion_tokens_per_s"],
    }
    write_result("serving", payload, out)
    bar_chart(
        out / "serving.png",
        title=f"Ray Serve, {serve['clients']} clients, {serve['new_tokens']} new tokens ({serve['machine']})",
        groups={
            "base model": {"tok/s": serve["completion_tokens_per_s"]["base"]},
            "8 distinct mixtures (ours)": {"tok/s": serve["completion_tokens_per_s"]["composed"]},
            "plain peft per request": {"tok/s": serve["completion_tokens_per_s"]["peft"]},
        },
        ylabel="completion tokens per second",
    )
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run(args.results, args.out)


if __name__ == "__main__":
    main()
