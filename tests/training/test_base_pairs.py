"""The base's pair record: kept while the training split grows little, refreshed otherwise, and
the base's view of the embed cache holds exactly the recorded scans."""
from __future__ import annotations

import pytest
import torch

from ctrlora.training.base_pairs import (UNLISTED, decide, read_record, record_of, restrict, training_rows,
                                         write_record)
from ctrlora.training.embed import ConditionEmbeds, EmbedCache


def _world(n_train: int, extra: int = 0, changed: str | None = None):
    """An embed cache of ``n_train + extra`` training scans, 2 validation scans, condition
    ``seg`` on every scan, and its index / content keys."""
    scans = [f"s{i:03d}" for i in range(n_train + extra)] + ["v000", "v001"]
    splits = ["train"] * (n_train + extra) + ["validation"] * 2
    captions = [f"caption {s}" for s in scans]
    photos = [f"p-{s}" + ("-new" if s == changed else "") for s in scans]
    n = len(scans)
    cache = EmbedCache(scans, splits, captions, 1.0, torch.zeros(n, 4, 2, 2), torch.zeros(n, 4, 2, 2),
                       torch.zeros(n, 3, 4), torch.zeros(1, 3, 4),
                       {"seg": ConditionEmbeds(torch.arange(n), torch.zeros(n, 4, 2, 2), torch.zeros(n, 4, 2, 2))})
    index = {"scan_ids": scans, "splits": splits, "captions": captions}
    keys = {"photos": photos, "conditions": {"seg": [f"c-{s}" for s in scans]}}
    return cache, index, keys


def _record(index, keys, backbone="bb"):
    rows = training_rows(index, keys, {"seg": list(range(len(index["scan_ids"])))}, ["seg"])
    return record_of(rows, backbone, ["seg"])


def test_record_kept_below_growth_and_refreshed_at_it(tmp_path):
    _, index, keys = _world(100)
    first, why = decide(None, _record(index, keys), 0.1)
    assert len(first["scans"]) == 100 and "no previous" in why
    path = tmp_path / "base_pairs.json"
    assert write_record(first, path)
    before = path.read_bytes()

    _, index9, keys9 = _world(100, extra=9)          # 9 % more: the base waits
    kept, why = decide(read_record(path), _record(index9, keys9), 0.1)
    assert kept == first and why.startswith("kept")
    assert not write_record(kept, path) and path.read_bytes() == before   # bytes (and DVC hash) untouched

    _, index10, keys10 = _world(100, extra=10)       # 10 %: refreshed to the whole split
    new, _ = decide(read_record(path), _record(index10, keys10), 0.1)
    assert len(new["scans"]) == 110

    assert len(decide(first, _record(index9, keys9), 0.0)[0]["scans"]) == 109   # 0: any new scan


def test_record_refreshed_when_a_recorded_scan_or_the_backbone_changes():
    _, index, keys = _world(50)
    first = _record(index, keys)
    _, index_c, keys_c = _world(50, changed="s007")
    assert "changed" in decide(first, _record(index_c, keys_c), 0.5)[1]
    assert "backbone" in decide(first, _record(index, keys, backbone="other"), 0.5)[1]
    with pytest.raises(ValueError, match=">= 0"):
        decide(first, first, -0.1)


def test_restrict_keeps_only_recorded_scans_and_refuses_a_stale_record():
    cache, index, keys = _world(20)
    record = _record(index, keys)
    assert restrict(cache, index, keys, record, "bb") is cache          # whole split: the cache itself

    grown, index_g, keys_g = _world(20, extra=3)
    view = restrict(grown, index_g, keys_g, record, "bb")
    assert view.pair_rows("seg").tolist() == list(range(20))            # recorded rows, in cache order
    assert view.splits[20:23] == [UNLISTED] * 3 and view.splits[-2:] == ["validation"] * 2

    changed, index_c, keys_c = _world(20, changed="s003")
    with pytest.raises(ValueError, match="rerun `dvc repro base_pairs`"):
        restrict(changed, index_c, keys_c, record, "bb")
    with pytest.raises(ValueError, match="another backbone"):
        restrict(cache, index, keys, record, "other")
