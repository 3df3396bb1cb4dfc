"""benchmarks/multi_condition.py at toy size: valid JSON, both paths run, equal outputs.
No wall-time assertion: the ratio belongs to benchmarks/README.md."""
from __future__ import annotations

import json

import pytest

from benchmarks import multi_condition

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_batched_and_sequential_paths_agree_and_report(tmp_path):
    out = tmp_path / "mc.json"
    report = multi_condition.main(["--random", "--counts", "1", "3", "--steps", "2", "--rounds", "1", "--batch", "1",
                                   "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["conditions"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        assert len(set(row["adapters"])) == row["conditions"]
        assert row["equal"] and row["max_abs_diff"] <= 1e-4 * max(1.0, row["latent_scale"])
        assert row["latent_scale"] > 0.1  # the latents are not trivially zero
        assert all(len(v) == 1 and min(v) > 0 for v in row["times_s"].values())
        assert row["ratio_sequential_over_batched"] > 0
    assert report["all_equal"] and report["setup"]["guidance"] > 1  # the CFG pair is in the batch


def test_more_conditions_than_adapters_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="4 conditions asked for"):
        multi_condition.main(["--random", "--counts", "4", "--steps", "1", "--rounds", "1", "--batch", "1",
                              "--out", str(tmp_path / "x.json")])
