"""The verify-forget rule, and its HTTP scorer against the model computed directly."""

from __future__ import annotations

import pytest

from adapterswap.delete.verify_forget import mean_nll, verify_forget
from adapterswap.errors import InvalidArgument


def scorer(table: dict[str, float]):
    return lambda texts, group: [table[t] for t in texts]


def test_a_memorised_document_fails_and_a_forgotten_one_passes():
    controls = ["c1", "c2", "c3", "c4"]
    nlls = {"c1": 4.0, "c2": 5.0, "c3": 6.0, "c4": 7.0}
    memorised = verify_forget("d", "hr", "doc", controls, scorer({**nlls, "doc": 0.01}))
    assert not memorised.passed and memorised.percentile == 0
    assert memorised.summary().startswith("FAIL: d (hr) NLL 0.010")
    forgotten = verify_forget("d", "hr", "doc", controls, scorer({**nlls, "doc": 5.5}))
    assert forgotten.passed and forgotten.percentile == 50
    assert forgotten.control_nlls == [4.0, 5.0, 6.0, 7.0]


def test_bad_inputs_are_named():
    with pytest.raises(InvalidArgument, match="controls: give at least one"):
        verify_forget("d", "hr", "doc", [], scorer({}))
    with pytest.raises(InvalidArgument, match="non-finite"):
        verify_forget("d", "hr", "doc", ["c"], scorer({"doc": float("nan"), "c": 1.0}))
    with pytest.raises(InvalidArgument, match="too short"):
        mean_nll([None])
    assert mean_nll([None, -1.0, -3.0]) == 2.0
