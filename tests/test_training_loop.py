"""The shared training loop: step-addressed randomness, checkpoints, kill-and-resume equality."""
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
                      gradient_accumulation_steps=2, log_every=1, seed=3)
    trainer = Trainer(cfg, model, model.parameters(), checkpoint_dir=os.path.join(out, "ckpt"))
    def loss_fn(m, step, gen):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # a real kill: no cleanup, no atexit
        x = torch.randn(cfg.batch_size, 8, generator=gen)
        y = (x @ w_true)[:, None] + 0.1 * torch.randn(cfg.batch_size, 1, generator=gen)
        return torch.nn.functional.mse_loss(m(x), y), {}
    result = trainer.fit(loss_fn, desc="toy")
    json.dump({"history": result.history, "resumed_from": result.resumed_from}, open(os.path.join(out, "result.json"), "w"))
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
