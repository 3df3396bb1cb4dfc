"""Where sampling runs: the GPU when torch sees one, else the CPU (:mod:`ctrlora.device`), and the
evaluation builds its pipeline there. Decided on a CPU by telling torch a GPU is (or is not)
visible; what a real card then computes is checked on GPU machines only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlora import device as device_lib
from ctrlora.evaluation import run as evaluation


@pytest.mark.parametrize("visible, want", [(True, "cuda"), (False, "cpu")])
def test_default_device_is_the_gpu_when_one_is_visible(monkeypatch, visible, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    assert device_lib.default_device() == torch.device(want)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("visible, want", [(True, "cuda"), (False, "cpu")])
def test_the_evaluation_builds_its_pipeline_on_the_default_device(monkeypatch, visible, want):
    """run_evaluation moves the pipeline (and with it the models) to default_device() before it
    generates anything; the fake pipeline stops the run there."""
    from ctrlora import sampling

    moved: list[torch.device] = []

    class FakePipe:
        def to(self, dev):
            moved.append(torch.device(dev))
            raise _Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    monkeypatch.setattr(sampling.CtrLoRAPipeline, "from_components", classmethod(lambda cls, bb, cn: FakePipe()))
    cfg = evaluation.EvalConfig(["segmentation"], ["lighting"], guidance=[1.0], gate_guidance=1.0)
    img = np.zeros((1, 8, 8, 3), np.uint8)
    test = evaluation.EvalData(["s0"], ["photo"], img, {"segmentation": img, "lighting": img})
    models = evaluation.EvalModels(backbone=None, controlnet=None, adapter_params={"segmentation": 1, "lighting": 1})
    with pytest.raises(_Stop):
        evaluation.run_evaluation(models, test, {}, cfg, progress=False, log=lambda s: None)
    assert moved == [torch.device(want)]
