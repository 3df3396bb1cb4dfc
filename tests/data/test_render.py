import hashlib

import numpy as np
import pytest

from ctrlora.data.captions import CAPTION_VOCABULARY, caption_from_meta, caption_words
from ctrlora.data.labels import BACKGROUND, GINGIVA, LABELS, TOOTH_LABEL_IDS
from ctrlora.data.render import DatasetConfig, RenderConfig, render_dataset, render_scan
from ctrlora.data.scan import REQUIRED_FILES, load_scan

SEEDS = [0, 1, 2, 3, 7, 11]


@pytest.fixture(scope="module")
def scans():
    return [render_scan(s) for s in SEEDS]


def _tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = render_dataset(DatasetConfig(out=tmp_path / "a", n=6, seed=5, workers=2, progress=False))
    b = render_dataset(DatasetConfig(out=tmp_path / "b", n=6, seed=5, workers=1, progress=False))
    da, db = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert a["scans"] == b["scans"] == 6
    assert len(da) == 6 * len(REQUIRED_FILES)
    assert da == db
    c = render_dataset(DatasetConfig(out=tmp_path / "c", n=6, seed=6, workers=1, progress=False))
    assert c["scans"] == 6 and _tree_digest(tmp_path / "c") != da
    # the files read back as the contract says
    scan = load_scan(next(p for p in (tmp_path / "a").iterdir()))
    assert scan.photo.shape == (64, 64, 3) and scan.segmentation.shape == (64, 64)


def test_resolution_is_configurable():
    rs = render_scan(3, RenderConfig(resolution=32))
    assert rs.scan.photo.shape == (32, 32, 3) and rs.scan.depth.shape == (32, 32)


def test_normals_unit_length(scans):
    for rs in scans:
        assert np.allclose(np.linalg.norm(rs.normal, axis=-1), 1.0, atol=1e-5)
        decoded = rs.scan.normal.astype(np.float32) / 127.5 - 1.0
        assert np.abs(np.linalg.norm(decoded, axis=-1) - 1.0).max() < 0.01
        assert (rs.normal[..., 2] > 0).all()  # visible surfaces face the camera


def test_depth_agrees_with_normals(scans):
    """Where a surface is smooth (same object on both sides) and clearly tilted, the depth
    difference between neighbours has the sign the normal predicts: n ∝ (-dZ/dx, +dZ/drow, 1)."""
    checked = 0
    for rs in scans:
        z, n, inst = rs.depth, rs.normal, rs.instance
        for axis, comp, sign in ((1, 0, -1.0), (0, 1, 1.0)):
            dz = np.diff(z, axis=axis)
            same = np.diff(inst, axis=axis) == 0
            fg = (np.delete(inst, -1, axis=axis) != -1)
            # normal at both ends strongly tilted the same way
            n0 = np.delete(n[..., comp], -1, axis=axis)
            n1 = np.delete(n[..., comp], 0, axis=axis)
            tilted = (np.abs(n0) > 0.3) & (np.abs(n1) > 0.3) & (np.sign(n0) == np.sign(n1))
            sel = same & fg & tilted
            checked += int(sel.sum())
            agree = np.sign(dz[sel]) == sign * np.sign(n0[sel])
            assert agree.mean() > 0.97, (axis, agree.mean())
        # and on the 8-bit depth map as written
        d8 = rs.scan.depth.astype(np.int16)
        dz8 = np.diff(d8, axis=1)
        same = (np.diff(inst, axis=1) == 0) & (inst[:, :-1] >= 0)
        n0, n1 = n[:, :-1, 0], n[:, 1:, 0]
        sel = same & (np.abs(n0) > 0.5) & (np.abs(n1) > 0.5) & (np.sign(n0) == np.sign(n1)) & (dz8 != 0)
        if sel.any():
            assert (np.sign(dz8[sel]) == -np.sign(n0[sel])).mean() > 0.95
    assert checked > 500


def test_segmentation_labels(scans):
    for rs in scans:
        seg, inst = rs.scan.segmentation, rs.instance
        assert set(np.unique(seg).tolist()) <= set(LABELS)
        tooth_px = inst >= 0
        assert tooth_px.sum() > 200  # teeth are large at 64 px
        expected = np.array([t.label for t in rs.teeth])[inst[tooth_px]]
        assert np.array_equal(seg[tooth_px], expected)
        assert np.isin(seg[tooth_px], list(TOOTH_LABEL_IDS)).all()
        assert (seg[inst == -2] == GINGIVA).all() and (seg[inst == -1] == BACKGROUND).all()
        # teeth and gums have depth, background has none
        assert (rs.scan.depth[seg != BACKGROUND] >= 1).all() and (rs.scan.depth[seg == BACKGROUND] == 0).all()
        # labels present correspond to the teeth the metadata lists as present
        named = {t.label for t in rs.teeth if t.name in rs.scan.meta["teeth_present"]}
        assert set(np.unique(seg[tooth_px]).tolist()) == named


def test_lighting_is_lambert_shading(scans):
    for rs in scans:
        fg = rs.scan.segmentation != BACKGROUND
        expected = np.clip(rs.normal @ rs.light, 0.0, None)
        got = rs.scan.lighting.astype(np.float32) / 255.0
        assert np.abs(got[fg] - expected[fg]).max() <= 0.5 / 255 + 1e-6
        assert (rs.scan.lighting[~fg] == 0).all()
        # the same holds for the 8-bit normals as written (quantisation tolerance)
        n8 = rs.scan.normal.astype(np.float32) / 127.5 - 1.0
        assert np.abs(np.clip(n8 @ rs.light, 0, None)[fg] - got[fg]).max() < 0.02


def test_photo_looks_like_teeth_on_dark_background(scans):
    for rs in scans:
        photo = rs.scan.photo.astype(np.float32)
        seg = rs.scan.segmentation
        luma = photo @ np.array([0.299, 0.587, 0.114])
        teeth = np.isin(seg, list(TOOTH_LABEL_IDS))
        bg = seg == BACKGROUND
        gum = seg == GINGIVA
        assert np.median(luma[teeth]) > np.median(luma[gum]) + 40
        if bg.sum() > 20:
            assert np.median(luma[bg]) < 45
        assert photo[gum][:, 0].mean() > photo[gum][:, 2].mean() + 30  # gums are red


def test_meta_and_caption(scans):
    vocab = set(CAPTION_VOCABULARY)
    for rs in scans:
        meta = rs.scan.meta
        assert meta["seed"] == SEEDS[scans.index(rs)] and meta["resolution"] == 64
        assert meta["jaw"] in ("both", "upper", "lower")
        assert abs(np.linalg.norm(meta["light_direction"]) - 1.0) < 1e-5
        assert not set(meta["teeth_present"]) & set(meta["teeth_missing"])
        cap = caption_from_meta(meta)
        assert set(caption_words(cap)) <= vocab, cap
        assert meta["shade"] in cap
