import numpy as np
import pytest

from ctrlora.data.conditions import (CONDITIONS, canny_edges, encode_u8, gaussian_blur, get_condition,
                                     quantise_palette)
from ctrlora.data.labels import LABELS, color_lut
from ctrlora.data.render import render_scan
from ctrlora.data.scan import Scan


def _scan(photo, **maps):
    return Scan(scan_id="t", photo=photo, **maps)


def test_registry_names_and_sources():
    assert list(CONDITIONS) == ["segmentation", "lighting", "normal", "depth", "canny", "grayscale", "blur", "palette"]
    assert {n for n, c in CONDITIONS.items() if c.source == "rendered"} == {"segmentation", "lighting", "normal", "depth"}
    assert {n for n, c in CONDITIONS.items() if c.source == "derived"} == {"canny", "grayscale", "blur", "palette"}
    with pytest.raises(KeyError, match="unknown condition"):
        get_condition("sketch")


def test_every_condition_encodes_a_rendered_scan():
    scan = render_scan(4).scan
    for name, cond in CONDITIONS.items():
        x = cond.encode(scan)
        assert x.shape == (64, 64, 3) and x.dtype == np.float32, name
        assert x.min() >= 0.0 and x.max() <= 1.0, name
        assert x.max() > x.min(), name  # not blank


def test_derived_conditions_need_only_the_photo():
    photo = render_scan(5).scan.photo
    for name, cond in CONDITIONS.items():
        if cond.source == "derived":
            assert cond.encode(_scan(photo)).shape == (64, 64, 3)
        else:
            with pytest.raises(ValueError, match="required"):
                cond.encode(_scan(photo))


def test_canny_marks_a_step_edge_and_nothing_else():
    img = np.zeros((32, 32), np.float32)
    img[:, 16:] = 1.0
    edges = canny_edges(img)
    cols = np.nonzero(edges.any(axis=0))[0]
    assert set(cols.tolist()) <= {15, 16}
    assert edges[4:-4, 15:17].any(axis=1).all()  # a continuous vertical line along the step
    assert canny_edges(np.full((32, 32), 0.5, np.float32)).sum() == 0


def test_grayscale_of_gray_is_itself():
    photo = np.repeat(np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)[..., None], 3, axis=2)
    out = CONDITIONS["grayscale"].encode(_scan(photo))
    assert np.allclose(out[..., 0], photo[..., 0] / 255.0, atol=1e-6)
    assert np.array_equal(encode_u8("grayscale", _scan(photo))[..., 1], photo[..., 0])


def test_blur_is_low_pass_and_preserves_mean():
    rng = np.random.default_rng(0)
    img = rng.random((64, 64, 3)).astype(np.float32)
    out = gaussian_blur(img)
    assert abs(out.mean() - img.mean()) < 1e-3
    assert out.std() < 0.3 * img.std()
    flat = np.full((16, 16, 3), 0.25, np.float32)
    assert np.allclose(gaussian_blur(flat), 0.25, atol=1e-6)


def test_palette_keeps_a_two_colour_image_and_limits_colours():
    photo = np.zeros((16, 16, 3), np.uint8)
    photo[:] = (200, 30, 60)
    photo[4:10, 3:12] = (240, 235, 220)
    assert np.array_equal(quantise_palette(photo), photo)
    photo2 = render_scan(6).scan.photo
    q = quantise_palette(photo2, colors=8)
    assert len(np.unique(q.reshape(-1, 3), axis=0)) <= 8
    assert np.abs(q.astype(int) - photo2.astype(int)).mean() < 20


def test_segmentation_encoding_uses_label_colours():
    seg = np.array([[0, 1], [2, 9]], np.uint8)
    out = CONDITIONS["segmentation"].encode(_scan(np.zeros((2, 2, 3), np.uint8), segmentation=seg))
    for (r, c), lab in np.ndenumerate(seg):
        assert tuple(np.round(out[r, c] * 255).astype(int)) == LABELS[int(lab)].color
    assert len({lab.color for lab in LABELS.values()}) == len(LABELS)  # colours tell labels apart
    assert tuple(color_lut()[200]) == (255, 0, 255)
