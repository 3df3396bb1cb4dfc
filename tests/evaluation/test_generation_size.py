"""The evaluation draws every image at the size of the scans it is compared with.

Controlled passes could take it from the condition images, but the uncontrolled pass has none: the
pipeline would fall back to the UNet's native size, so ``generation.generate`` passes the scans'
height and width. The tiny preset's native size is the scans' size, which hides a miss; a real
SD 1.5 (512 px) on 64 px scans drew 512 px images and the segmentation scoring refused them
(found by the SD 1.5 graph, ``tests/pipelines/test_sd15_graph.py``)."""
from __future__ import annotations

import numpy as np
import pytest
from _models_helpers import tiny_eval_backbone


def test_uncontrolled_images_have_the_scans_size():
    from ctrlora.evaluation.generation import SamplingConfig, generate
    from ctrlora.evaluation.loading import EvalData
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.sampling import CtrLoRAPipeline

    bb = tiny_eval_backbone(32)  # the UNet's native size: 32 px
    pipe = CtrLoRAPipeline.from_components(bb, CtrLoRAControlNet.from_unet(bb.unet))
    pipe.set_progress_bar_config(disable=True)
    scans = np.zeros((2, 16, 16, 3), np.uint8)
    data = EvalData(["a", "b"], ["upper molar", "upper molar"], scans, {"lighting": scans})
    s = SamplingConfig(steps=1, guidance_scale=1.0, batch_size=2)
    assert generate(pipe, data, {"lighting": ("lighting", 1.0, "__base__")}, s, progress=False).shape == (2, 16, 16, 3)
    assert generate(pipe, data, {}, s, progress=False).shape == (2, 16, 16, 3)


def _pipe(native: int):
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.sampling import CtrLoRAPipeline

    bb = tiny_eval_backbone(native)
    pipe = CtrLoRAPipeline.from_components(bb, CtrLoRAControlNet.from_unet(bb.unet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_scans_at_the_native_size_draw_the_same_images_as_before():
    """At the UNet's native size, passing height and width changes nothing: the images are the
    pipeline's default-size ones, bit for bit."""
    from ctrlora.evaluation.generation import SamplingConfig, _tensor01, generate
    from ctrlora.evaluation.loading import EvalData

    pipe = _pipe(32)
    scans = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    data = EvalData(["a", "b"], ["upper molar", "lower molar"], scans, {"lighting": scans})
    s = SamplingConfig(steps=2, guidance_scale=1.0, batch_size=2, seed=3)
    for conds in ({}, {"lighting": ("lighting", 1.0, "__base__")}):
        got = generate(pipe, data, conds, s, progress=False)
        cond_t = {k: (_tensor01(data.conditions[c]), w, ad) for k, (c, w, ad) in conds.items()}
        ref = pipe(list(data.captions), conditions=cond_t, num_inference_steps=2, guidance_scale=1.0,
                   scheduler="ddim", seed=[3, 4], output_type="np", progress=False).images
        assert np.array_equal(got, np.clip(np.round(np.asarray(ref) * 255.0), 0, 255).astype(np.uint8))


def test_a_size_the_unet_cannot_take_is_refused():
    from ctrlora.evaluation.generation import SamplingConfig, generate
    from ctrlora.evaluation.loading import EvalData

    pipe = _pipe(32)
    scans = np.zeros((1, 18, 18, 3), np.uint8)
    data = EvalData(["a"], ["upper molar"], scans, {"lighting": scans})
    with pytest.raises(ValueError, match="multiples of"):
        generate(pipe, data, {}, SamplingConfig(steps=1, guidance_scale=1.0, batch_size=1), progress=False)
