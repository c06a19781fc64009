"""Issue 14, point 9: the demo's plots label every value they draw, and a recalled fact's
NLL of 0 is drawn and labelled, not an invisible bar that reads as missing data."""

from __future__ import annotations

import pytest

from adapterswap.cli.demo_report import forget_figure, recall_figure, write_report

NLLS = {"alice": [0.0, 3.25, 1.5], "bob": [4.0, 0.0, 2.75]}


@pytest.fixture
def result() -> dict:
    """A demo result as ``adapterswap demo`` records it, with two facts recalled exactly."""
    facts = ["vault", "leave", "kelp"]
    verify = {"doc_id": "vault", "control_nlls": [2.0, 2.5, 3.0], "passed": True}
    return {
        "home": "/tmp/demo",
        "seconds": 1.0,
        "users": {"alice": ["engineering"], "bob": ["hr"]},
        "recall": {
            user: [
                {"doc_id": f, "answer_nll": v, "recalled": v < 0.5, "adapters": ["a"]}
                for f, v in zip(facts, values, strict=True)
            ]
            for user, values in NLLS.items()
        },
        "deleted": {
            "doc_id": "vault",
            "before": {"answer_nll": 0.0},
            "after": {"answer_nll": 2.4},
            "kept_before": {"doc_id": "kelp", "answer_nll": 1.5},
            "kept_after": {"doc_id": "kelp", "answer_nll": 1.5},
            "verify_forget_before": {**verify, "deleted_nll": 0.0, "percentile": 0.0},
            "verify_forget": {**verify, "deleted_nll": 2.4, "percentile": 50.0},
        },
        "batch2": {"shards": ["s2"], "unchanged": [True, True]},
    }


def test_every_recall_bar_is_labelled_and_a_zero_bar_is_drawn(result):
    (ax,) = recall_figure(result).axes
    labels = sorted(text.get_text() for text in ax.texts)
    assert labels == sorted(f"{v:.2f}" for values in NLLS.values() for v in values)
    zero_bars = [bar for bar in ax.patches if bar.get_height() == 0.0]
    assert len(zero_bars) == 2
    for bar in zero_bars:
        assert bar.get_linewidth() > 0 and bar.get_edgecolor()[3] > 0  # an outline, opaque
        assert ax.get_ylim()[0] < 0  # its line clears the axis at 0
    top = max(v for values in NLLS.values() for v in values)
    assert ax.get_ylim()[1] > top  # the tallest bar's label is inside the plot


def test_the_forget_plot_labels_the_document_before_and_after(result):
    (ax,) = forget_figure(result).axes
    assert sorted(text.get_text() for text in ax.texts) == ["0.00 (p0)", "2.40 (p50)"]


def test_write_report_writes_both_plots(result, tmp_path):
    report = write_report(tmp_path / "report", result)
    for name in ("recall.png", "forget.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![recall](recall.png)" in report.read_text()
