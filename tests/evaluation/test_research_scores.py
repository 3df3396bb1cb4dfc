"""research.run_scores draws through the production evaluation's generation path (run.run_job) and
gives the images its own generate loop gave, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from _models_helpers import perturb, tiny_eval_backbone


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_run_scores_images_match_a_direct_generate(guidance):
    from ctrlora.evaluation.generation import SamplingConfig, generate
    from ctrlora.evaluation.loading import EvalData
    from ctrlora.evaluation.research import run_scores
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.sampling import CtrLoRAPipeline

    bb = tiny_eval_backbone(32)
    cn = CtrLoRAControlNet.from_unet(bb.unet)
    perturb(cn, 1)  # non-zero zero-convs: the control changes the images
    rng = np.random.default_rng(0)
    scans = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    data = EvalData(["a", "b", "c"], ["upper molar", "lower molar", "upper molar"], scans,
                    {"canny": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)})
    s = SamplingConfig(steps=2, guidance_scale=guidance, batch_size=2, seed=5)
    pipe = CtrLoRAPipeline.from_components(bb, cn)
    pipe.set_progress_bar_config(disable=True)
    for adapter in (None, "__base__"):
        images, fid = run_scores(bb, cn, adapter, "canny", data, {}, s)
        conds = {} if adapter is None else {"canny": ("canny", 1.0, adapter)}
        assert np.array_equal(images, generate(pipe, data, conds, s, progress=False))
        assert fid.shape == (3,) and fid.dtype == np.float64
