"""The embed cache brought up to date by content: only new or changed inputs are encoded, and the
result is the cache a fresh build over the same prepared data gives."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests._models_helpers import tiny_eval_backbone

SIZE = 32
CONDITIONS = ["segmentation", "depth"]


def _prepare(data, sources, out):
    from ctrlora.data.contract import ContractConfig
    from ctrlora.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(sources=tuple(sources), out=out, data_root=data, test_fraction=0.25,
                          validation_fraction=0.25, conditions=tuple(CONDITIONS),
                          contract=ContractConfig(resolution=SIZE), workers=1, progress=False))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ctrlora.data.render import DatasetConfig, render_dataset

    root = tmp_path_factory.mktemp("embed_update")
    data = root / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=16, seed=3, resolution=SIZE, workers=1, progress=False))
    render_dataset(DatasetConfig(out=data / "landed", n=6, seed=4, resolution=SIZE, workers=1, progress=False))
    _prepare(data, [data / "rendered"], data / "before")
    _prepare(data, [data / "rendered", data / "landed"], data / "after")
    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    return root, data, bb


def _assert_same(a, b):
    assert a.scan_ids == b.scan_ids and a.splits == b.splits and a.captions == b.captions
    assert a.scaling_factor == b.scaling_factor and sorted(a.conditions) == sorted(b.conditions)
    # equal up to float order (on the CPU this was written on they are bit-identical)
    close = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(a.photo_mean, b.photo_mean, **close)
    torch.testing.assert_close(a.photo_logvar, b.photo_logvar, **close)
    torch.testing.assert_close(a.text, b.text, **close)
    torch.testing.assert_close(a.empty_text, b.empty_text, **close)
    for c in a.conditions:
        assert torch.equal(a.conditions[c].photo_index, b.conditions[c].photo_index)
        torch.testing.assert_close(a.conditions[c].mean, b.conditions[c].mean, **close)
        torch.testing.assert_close(a.conditions[c].logvar, b.conditions[c].logvar, **close)


def test_landing_encodes_only_the_new_scans(world):
    from ctrlora.training.embed import build_embed_cache, save_embed_cache
    from ctrlora.training.embed_update import load_previous, save_keys, update_embed_cache

    root, data, bb = world
    enc = (bb.vae, bb.text_encoder, bb.tokenizer)
    first, keys, rep = update_embed_cache(*enc, data / "before", CONDITIONS, "bb1", progress=False)
    assert rep.previous == "none" and rep.photos_reused == 0 and rep.photos_encoded == 16
    _assert_same(first, build_embed_cache(*enc, data / "before", CONDITIONS, progress=False))
    save_embed_cache(first, root / "embed")
    save_keys(keys, root / "embed", root / "keys.json")

    prev, prev_keys, status = load_previous(root / "embed", root / "keys.json", "bb1")
    assert status == "used"
    updated, _, rep = update_embed_cache(*enc, data / "after", CONDITIONS, "bb1", prev, prev_keys, batch_size=4,
                                         progress=False)
    assert (rep.photos_reused, rep.photos_encoded) == (16, 6)
    assert (rep.conditions_reused, rep.conditions_encoded) == (32, 12)
    _assert_same(updated, build_embed_cache(*enc, data / "after", CONDITIONS, progress=False))

    # another backbone: nothing of the old cache is used
    assert load_previous(root / "embed", root / "keys.json", "bb2")[2].startswith("ignored")


def test_changed_input_is_encoded_again_and_stale_keys_are_ignored(world):
    from ctrlora.data.pairs import read_pairs
    from ctrlora.training.embed import build_embed_cache, save_embed_cache
    from ctrlora.training.embed_update import load_previous, save_keys, update_embed_cache

    root, data, bb = world
    enc = (bb.vae, bb.text_encoder, bb.tokenizer)
    work = root / "changed"
    shutil.copytree(data / "before", work)
    cache, keys, _ = update_embed_cache(*enc, work, CONDITIONS, "bb1", progress=False)
    save_embed_cache(cache, root / "embed2")
    save_keys(keys, root / "embed2", root / "keys2.json")

    # one depth map redrawn: that row alone is encoded again
    rows = read_pairs(work, "depth")
    target, other = work / rows[0]["condition"], work / rows[1]["condition"]
    shutil.copyfile(other, target)
    prev, prev_keys, status = load_previous(root / "embed2", root / "keys2.json", "bb1")
    updated, _, rep = update_embed_cache(*enc, work, CONDITIONS, "bb1", prev, prev_keys, progress=False)
    assert (rep.photos_encoded, rep.conditions_encoded) == (0, 0)  # identical bytes elsewhere: reused by key
    assert torch.equal(updated.conditions["depth"].mean[0], updated.conditions["depth"].mean[1])
    _assert_same(updated, build_embed_cache(*enc, work, CONDITIONS, progress=False))

    # a cache that is not the one the keys were written for is never reused
    save_embed_cache(updated, root / "embed2")
    assert load_previous(root / "embed2", root / "keys2.json", "bb1")[2].startswith("ignored: ")
    assert load_previous(root / "embed2", root / "missing.json", "bb1")[2] == "none"
