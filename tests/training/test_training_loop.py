"""The shared training loop: step-addressed randomness, checkpoints, kill-and-resume equality,
the learning-rate schedule and EMA; the denoising objective."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ctrlora.training.loop import TrainConfig, Trainer, step_generator

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, torch
    from ctrlora.training.loop import TrainConfig, Trainer
    out, kill_at = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    w_true = torch.linspace(-1, 1, 8)
    cfg = TrainConfig(max_steps=12, batch_size=4, learning_rate=3e-2, checkpoint_every=4,
                      gradient_accumulation_steps=2, log_every=1, seed=3, warmup_steps=3,
                      lr_schedule="cosine", min_lr_ratio=0.1, ema_decay=0.9)
    trainer = Trainer(cfg, model, model.parameters(), checkpoint_dir=os.path.join(out, "ckpt"))
    def loss_fn(m, step, gen):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # a real kill: no cleanup, no atexit
        x = torch.randn(cfg.batch_size, 8, generator=gen)
        y = (x @ w_true)[:, None] + 0.1 * torch.randn(cfg.batch_size, 1, generator=gen)
        return torch.nn.functional.mse_loss(m(x), y), {}
    result = trainer.fit(loss_fn, desc="toy")
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    json.dump({"history": result.history, "resumed_from": result.resumed_from, "weights": weights},
              open(os.path.join(out, "result.json"), "w"))
    """
)


def _run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    full = _run(tmp_path / "full", kill_at=-1)
    assert full.returncode == 0, full.stderr
    ref = json.loads((tmp_path / "full" / "result.json").read_text())

    killed = _run(tmp_path / "resumed", kill_at=7)  # dies after the step-4 checkpoint
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed" / "result.json").exists()
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "ckpt").glob("step_*"))
    assert ckpts == ["step_0000004"]

    again = _run(tmp_path / "resumed", kill_at=-1)
    assert again.returncode == 0, again.stderr
    res = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert res["resumed_from"] == 4
    assert [r["step"] for r in res["history"]] == list(range(1, 13))
    ref_losses = [r["loss"] for r in ref["history"]]
    res_losses = [r["loss"] for r in res["history"]]
    assert res_losses == ref_losses  # bit-identical on CPU with the same seed
    assert res["weights"] == ref["weights"]  # the EMA shadow was checkpointed and restored
    assert sum(ref_losses[-4:]) < sum(ref_losses[:4])  # it does learn


def test_step_generator_is_addressed_by_seed_and_step():
    a = torch.randn(4, generator=step_generator(1, 5))
    assert torch.equal(a, torch.randn(4, generator=step_generator(1, 5)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(1, 6)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(2, 5)))


def test_trainer_refuses_nothing_to_train():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(TrainConfig(), model, model.parameters())


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="learning_rat"):
        TrainConfig.from_dict({"learning_rat": 1.0})


def test_learning_rate_schedule_warms_up_then_follows_cosine():
    cfg = TrainConfig(max_steps=110, learning_rate=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert cfg.lr_factor(1) == pytest.approx(0.1)
    assert cfg.lr_factor(10) == pytest.approx(1.0)
    assert cfg.lr_factor(60) == pytest.approx(0.55)  # half-way down the cosine
    assert cfg.lr_factor(110) == pytest.approx(0.1)
    assert TrainConfig(max_steps=5).lr_factor(3) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(max_steps=5, warmup_steps=5)


def test_ema_weights_replace_the_trained_ones_at_the_end():
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    start = model.weight.detach().clone()
    cfg = TrainConfig(max_steps=40, batch_size=8, learning_rate=0.1, ema_decay=0.99, max_grad_norm=None)
    trainer = Trainer(cfg, model, model.parameters())
    raw = {}

    def loss_fn(m, step, gen):
        raw["w"] = m.weight.detach().clone()
        x = torch.randn(8, 1, generator=gen)
        return ((m(x) - 3 * x) ** 2).mean(), {}

    trainer.fit(loss_fn)
    final = model.weight.detach()
    # the average lags the raw weights: between the start and the last raw value
    assert float(start) < float(final) < float(raw["w"])


def test_denoising_target_and_min_snr_weights():
    from diffusers import DDPMScheduler

    from ctrlora.training.diffusion import denoising_loss, denoising_target, min_snr_weights, snr

    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(denoising_target(eps, x0, noise, t), noise)
    a = v.alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - v.alphas_cumprod[t]).sqrt()[:, None, None, None]
    assert torch.allclose(denoising_target(v, x0, noise, t), a * noise - s * x0, atol=1e-6)
    r = snr(v, t)
    w = min_snr_weights(v, t, gamma=5.0)
    assert torch.allclose(w, torch.clamp(r, max=5.0) / (r + 1))
    assert w[0] < 1 and w[2] == pytest.approx(float(r[2] / (r[2] + 1)))  # high noise: snr < gamma
    # an exact prediction has zero loss; gamma = 0 is plain MSE
    assert float(denoising_loss(v, denoising_target(v, x0, noise, t), x0, noise, t, 5.0)) == 0.0
    pred = torch.zeros_like(x0)
    assert float(denoising_loss(eps, pred, x0, noise, t)) == pytest.approx(float((noise ** 2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        denoising_target(DDPMScheduler(prediction_type="sample"), x0, noise, t)


def test_trainers_with_different_precisions_run_in_one_process():
    # the backbone stage trains its VAE in bf16 and then its UNet in fp32
    for precision in ("bf16", "no", "bf16"):
        model = torch.nn.Linear(4, 1)
        trainer = Trainer(TrainConfig(max_steps=2, batch_size=4, mixed_precision=precision), model, model.parameters())
        trainer.fit(lambda m, step, gen: (m(torch.randn(4, 4, generator=gen)).pow(2).mean(), {}))
        assert trainer.accelerator.mixed_precision == precision


def test_base_schedule_gives_a_condition_its_share_of_steps():
    from collections import Counter

    from ctrlora.training.controlnet import base_schedule, condition_schedule

    conds = ["segmentation", "depth", "canny", "palette"]
    assert base_schedule(conds) == conds
    sched = base_schedule(conds, {"canny": 2})
    assert sched == conds + ["canny"]
    # every round of five steps is a fresh order of the list: canny in 2 of every 5
    drawn = [condition_schedule(sched, 0, s) for s in range(1, 1001)]
    counts = Counter(drawn)
    assert counts["canny"] == 400 and counts["segmentation"] == counts["depth"] == counts["palette"] == 200
    assert all(Counter(drawn[i:i + 5])["canny"] == 2 for i in range(0, 1000, 5))
    with pytest.raises(ValueError, match="not base conditions"):
        base_schedule(conds, {"lighting": 2})
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        base_schedule(conds, {"canny": 0})


def test_resume_is_logged_not_printed(tmp_path, caplog, capsys):
    def fresh() -> Trainer:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        cfg = TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=2)
        return Trainer(cfg, model, model.parameters(), checkpoint_dir=tmp_path / "ckpt")

    def loss_fn(m, step, gen):
        return m(torch.randn(2, 2, generator=gen)).pow(2).mean(), {}

    fresh().fit(loss_fn)
    capsys.readouterr()
    with caplog.at_level("INFO", logger="ctrlora.training.loop"):
        step, _ = fresh().try_resume()
    assert step == 2
    assert any(r.levelname == "INFO" and r.getMessage().startswith("resuming from ") and "(step 2)" in r.getMessage()
               for r in caplog.records), caplog.text
    assert "resuming from" not in capsys.readouterr().out
