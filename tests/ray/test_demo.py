"""The demo end to end, fast: tiny model, two training steps. Every step's claims that do not
need a model able to learn are checked by the demo itself (it raises DemoFailed); this test
checks what it reports and writes. The knowledge claims run with the embedded model in
``adapterswap demo`` and in tests/ray/test_deletion_knowledge.py."""

from __future__ import annotations

from pathlib import Path

from adapterswap.cli.demo import DELETE, USERS, run_demo


def test_the_demo_runs_every_step_and_writes_its_report(tiny_config):
    config = tiny_config()
    lines: list[str] = []
    report = run_demo(config, echo=lines.append, steps=2)
    steps = [line for line in lines if line.startswith("\n[")]
    assert [s.split("]")[0] for s in steps] == [f"\n[{i}/7" for i in range(1, 8)]

    for user, groups in USERS.items():  # each user was served only its own groups' adapters
        for recall in report["recall"][user]:
            assert all(a.split(".")[0] in groups for a in recall["adapters"])
    alice = report["recall"]["alice"]
    assert any(r["adapters"] for r in alice)  # alice's questions were routed to her adapters
    deleted = report["deleted"]
    assert deleted["doc_id"] == DELETE
    assert (
        deleted["before"]["adapters"]
        and deleted["before"]["adapters"] != deleted["after"]["adapters"]
    )  # the revoked version is gone from what serves it
    assert len(deleted["verify_forget"]["control_nlls"]) == 6
    assert deleted["verify_forget_before"]["doc_id"] == DELETE
    assert report["batch2"]["shards"] and all(report["batch2"]["unchanged"])

    out = Path(report["home"]) / "report"
    assert {p.name for p in out.iterdir()} >= {"report.md", "recall.png", "forget.png"}
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert f"## Deleting {DELETE}" in text and "verify-forget:" in text
