"""The VAE pretraining's batch mix: photos share, and per-condition draw weights."""
from __future__ import annotations

import pytest
import torch

from ctrlora.training.backbone import VAEPretrainConfig, _condition_pool
from ctrlora.training.loop import TrainConfig


def _maps(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 3, 4, 4), value)


def test_unweighted_mapping_is_the_plain_pool():
    pool, draw = _condition_pool({"a": _maps(2, 0.0), "b": _maps(3, 1.0)}, {})
    assert pool.shape[0] == 5 and draw is None


def test_weights_make_one_condition_drawn_more_often():
    conds = {"canny": _maps(10, 1.0), "depth": _maps(10, 0.0)}
    pool, draw = _condition_pool(conds, {"canny": 3.0})
    pick = torch.multinomial(draw, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = float(pool[pick][:, 0, 0, 0].mean())  # canny images are the ones holding 1.0
    assert share == pytest.approx(0.75, abs=0.02)


def test_bad_weights_are_refused_with_the_name():
    with pytest.raises(ValueError, match="canny"):
        VAEPretrainConfig(TrainConfig(), condition_weights={"canny": 0.0})
    with pytest.raises(ValueError, match="edges"):
        _condition_pool({"canny": _maps(1, 1.0)}, {"edges": 2.0})
    with pytest.raises(ValueError, match="by name"):
        _condition_pool(_maps(2, 1.0), {"canny": 2.0})
