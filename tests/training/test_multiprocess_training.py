"""Base and adapter training under ``accelerate launch`` with two CPU processes (gloo), through
the real stage entry points (``-m pipelines.stages.train_base``, ``-m pipelines.stages.train_adapter``).

A temp copy of ``ctrlora/`` and ``pipelines/`` with a tiny ``params.yaml``, a tiny backbone and
an embed cache of random pairs is the project. One sequence of runs checks:

* resume across process counts: a one-process base run killed after a checkpoint resumes under
  two processes;
* two processes train what one process trains with the same ``batch_size`` (the global batch:
  each process runs half of the same drawn batch and DDP averages the two halves' gradients):
  the resumed two-process base and then a two-process adapter end where an uninterrupted
  one-process run ends. Not bit for bit: float summation order differs (one mean over 4 samples
  vs the mean of two means over 2, then the all-reduce), ~1e-7 relative per step, and Adam
  divides each gradient by its running RMS. Tolerance: 1e-4 of the largest weight (training
  moved weights by up to ~8e-3: lr 1e-3 x 8 Adam steps), losses to 1e-4 relative;
* the outputs (model, adapters, loss curves, the stage timing) are written once, by rank 0.

A second, smaller test saves a checkpoint at every step of a two-process run of the bare
:class:`Trainer` over folders a killed run left behind: every checkpoint must hold each rank's
RNG-state file (a rank writing into a temporary folder that the main process was still clearing
or renaming lost that file or failed the save).

On a CPU-only machine ``accelerate launch --cpu`` runs one process unless MPI is installed;
``--multi_gpu`` with ``ACCELERATE_USE_CPU=true`` starts the processes through torchrun and
accelerate joins them over gloo.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _models_helpers import tiny_test_config

REPO = Path(__file__).resolve().parents[2]
BASE_CONDITIONS = ["segmentation", "depth"]
NEW_CONDITION = "lighting"
STEPS = 8
BATCH = 4
WORDS = ["upper", "lower", "molar", "incisor", "photo", "teeth", "dental"]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.multiprocess]


def _write_params(root: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    train = {"max_steps": STEPS, "batch_size": BATCH, "learning_rate": 1.0e-3, "checkpoint_every": 2,
             "log_every": 1, "seed": 0}
    params["train_base"].update(conditions=BASE_CONDITIONS, condition_shares={}, rank=2, train=dict(train))
    params["train_adapter"].update(conditions=[NEW_CONDITION], rank=2, max_pairs=None, train=dict(train))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _write_artefacts(root: Path) -> None:
    """A tiny backbone (16 px) and an embed cache of 8 random training pairs per condition, both
    in the layout the ``backbone`` and ``embed`` stages write."""
    from ctrlora.models.backbone import build_tiny_backbone
    from ctrlora.models.latents import encode_posterior, encode_text
    from ctrlora.training.embed import ConditionEmbeds, EmbedCache, save_embed_cache

    cfg = tiny_test_config(image_size=16, vae_block_out_channels=(32, 32), unet_block_out_channels=(32, 32),
                           unet_attention_heads=(2, 2), unet_layers_per_block=1, text_layers=1)
    bb = build_tiny_backbone(cfg, WORDS)
    bb.save(root / "models" / "backbone")
    n, g = 8, torch.Generator().manual_seed(0)
    photos = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    captions = [" ".join(WORDS[i % len(WORDS)] for i in range(k, k + 3)) for k in range(n)]
    with torch.no_grad():
        mean, logvar = encode_posterior(bb.vae, photos, None)
        conds = {}
        for c in BASE_CONDITIONS + [NEW_CONDITION]:
            cm, cl = encode_posterior(bb.vae, torch.rand(n, 3, 16, 16, generator=g), None)
            conds[c] = ConditionEmbeds(torch.arange(n), cm, cl)
        text = encode_text(bb.text_encoder, bb.tokenizer, captions, None)
        empty = encode_text(bb.text_encoder, bb.tokenizer, [""])
    cache = EmbedCache([f"s{i}" for i in range(n)], ["train"] * n, captions, float(bb.vae.config.scaling_factor),
                       mean, logvar, text, empty, conds)
    save_embed_cache(cache, root / "data" / "embed")
    # the rows' content keys, as the embed stage writes them (train_base reads its rows through
    # the base_pairs record, which names rows by these keys)
    from ctrlora.models.backbone import backbone_hash
    from ctrlora.training.embed_update import EmbedKeys, save_keys

    keys = EmbedKeys(backbone_hash(root / "models" / "backbone"), [f"photo-{i}" for i in range(n)],
                     {c: [f"{c}-{i}" for i in range(n)] for c in conds})
    save_keys(keys, root / "data" / "embed", root / "data" / "embed_keys.json")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess") / "template"
    for pkg in ("ctrlora", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    _write_params(root)
    _write_artefacts(root)
    _run(root, ["pipelines.stages.base_pairs"], 1)
    return root


def _project(template: Path, name: str) -> Path:
    root = template.parent / name
    shutil.copytree(template, root, symlinks=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(module_args: list[str], processes: int, module: bool = True) -> list[str]:
    """The command that runs ``module_args`` (``-m`` module and its arguments, or with
    ``module=False`` a script and its arguments) in ``processes`` processes."""
    m = ["-m"] if module else []
    if processes == 1:
        return [sys.executable, *m, *module_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *m, *module_args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH="",
                TQDM_DISABLE="1", ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")


def _run(root: Path, module_args: list[str], processes: int) -> str:
    res = subprocess.run(_command(module_args, processes), cwd=root, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-12000:]
    return res.stdout + res.stderr  # the library's progress messages go to stderr (logging)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _curve(path: Path) -> list[list[float]]:
    lines = path.read_text().splitlines()
    return [[float(x) for x in line.split(",") if x] for line in lines[1:]]


def _assert_close_weights(got: dict, ref: dict, label: str) -> None:
    """Equal up to 1e-4 of the largest weight (the training moved weights by up to ~6e-3: lr 1e-3
    x 6 Adam steps, so the bound is ~60x below what training changed)."""
    assert got.keys() == ref.keys(), label
    scale = max(1.0, *(float(v.float().abs().max()) for v in ref.values()))
    diff = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    print(f"{label}: max |other - 1-proc| = {diff:.3g} (largest weight {scale:.3g})")
    assert diff <= 1e-4 * scale, label


def _assert_close_curves(got: Path, ref: Path) -> None:
    a, b = _curve(got), _curve(ref)
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-4, abs=1e-6)


REFERENCE = f"""
from pipelines.stages import train_adapter, train_base
train_base.main()
train_adapter.main([{NEW_CONDITION!r}])
"""


def _kill_after_first_checkpoint(root: Path, processes: int) -> list[str]:
    """Start the base stage, SIGKILL the whole launch as soon as a checkpoint is complete; the
    checkpoints left."""
    proc = subprocess.Popen(_command(["pipelines.stages.train_base"], processes), cwd=root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = root / "checkpoints" / "train_base"
    deadline = time.monotonic() + 240
    while not any(ckpts.glob("*/step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # no cleanup, no atexit, in any process of the launch
    proc.wait()
    return sorted(p.name for p in ckpts.glob("*/step_*"))


def test_two_processes_resume_and_train_what_one_trains(template):
    ref, run = _project(template, "one"), _project(template, "two")
    res = subprocess.run([sys.executable, "-c", REFERENCE], cwd=ref, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    kept = _kill_after_first_checkpoint(run, 1)
    assert kept and not (run / "models/base").exists(), "the one-process run finished before it was killed"
    resumed = int(kept[-1].split("_")[1])
    assert 0 < resumed < STEPS
    # what a kill during the next save leaves (the poll can be late on a busy machine): a
    # half-written temporary folder, which the two-process run must clear before writing into it
    half = next((run / "checkpoints" / "train_base").glob("*/step_*")).parent / f".tmp_step_{resumed + 2:07d}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"half")
    out_base = _run(run, ["pipelines.stages.train_base"], 2)
    out_adapter = _run(run, ["pipelines.stages.train_adapter", NEW_CONDITION], 2)
    assert out_base.count(f"(step {resumed})") == 1  # logged by the main process only
    assert out_base.count("[train_base] ok") == 2  # both ranks ran the stage

    rel = "models/base/diffusion_pytorch_model.safetensors"
    _assert_close_weights(_weights(run / rel), _weights(ref / rel), "base (1 process, resumed under 2)")
    for c in BASE_CONDITIONS:
        d = f"models/base/adapters/{c}"
        for f in (ref / d).glob("*.safetensors"):
            _assert_close_weights(_weights(run / d / f.name), _weights(f), f"base adapter {c}")
    d = f"models/adapters/{NEW_CONDITION}"
    for f in (ref / d).glob("*.safetensors"):
        _assert_close_weights(_weights(run / d / f.name), _weights(f), "adapter (2 processes)")
    _assert_close_curves(run / "reports/train_base/loss.csv", ref / "reports/train_base/loss.csv")
    _assert_close_curves(run / f"reports/train_adapter/{NEW_CONDITION}_loss.csv",
                         ref / f"reports/train_adapter/{NEW_CONDITION}_loss.csv")

    # rank 0 alone wrote the outputs and timings; the checkpoints are gone after success
    timings = [json.loads(line) for line in (run / "logs/stage_times.jsonl").read_text().splitlines()]
    # (base_pairs ran once, one process, when the template was made)
    assert [t["stage"] for t in timings] == ["base_pairs", "train_base", f"train_adapter@{NEW_CONDITION}"]
    assert not any((run / "checkpoints").rglob("step_*"))
    assert "adapter" in out_adapter


SAVE_EVERY_STEP = """
import sys
from pathlib import Path
import torch
from ctrlora.training.loop import TrainConfig, Trainer, make_accelerator

out, steps = Path(sys.argv[1]), int(sys.argv[2])
cfg = TrainConfig(max_steps=steps, batch_size=2, checkpoint_every=1, keep_checkpoints=steps, log_every=1)
acc = make_accelerator(cfg)
model = torch.nn.Linear(4, 4)
trainer = Trainer(cfg, model, model.parameters(), out / "ckpt", accelerator=acc, global_batch=True)

def loss_fn(m, step, g):
    x = torch.randn(2, 4, generator=g)[trainer.share()]
    return m(x).pow(2).mean(), {}

def on_log(row):
    with open(out / f"on_log_{acc.process_index}.txt", "a") as fh:
        fh.write(f"{row['step']}\\n")

trainer.fit(loss_fn, on_log=on_log)
"""


def test_every_rank_writes_its_part_of_every_checkpoint(tmp_path):
    steps = 6
    script = tmp_path / "save_every_step.py"
    script.write_text(SAVE_EVERY_STEP)
    ckpt = tmp_path / "ckpt"
    for s in range(2, steps + 1, 2):  # left by a run killed during its saves
        half = ckpt / f".tmp_step_{s:07d}"
        half.mkdir(parents=True)
        for i in range(50):
            (half / f"part_{i}").write_bytes(b"x" * 64)
    cmd = _command([str(script), str(tmp_path), str(steps)], 2, module=False)
    res = subprocess.run(cmd, cwd=tmp_path, env=dict(_env(), PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-12000:]

    saved = sorted(p.name for p in ckpt.iterdir())
    assert saved == [f"step_{s:07d}" for s in range(1, steps + 1)]  # no temporary folder left
    for name in saved:
        files = {p.name for p in (ckpt / name).iterdir()}
        assert files == {"model.safetensors", "optimizer.bin", "trainer_state.json",
                         "random_states_0.pkl", "random_states_1.pkl"}, name
    # the log callback (where callers write files) runs on the main process only
    assert (tmp_path / "on_log_0.txt").read_text().split() == [str(s) for s in range(1, steps + 1)]
    assert not (tmp_path / "on_log_1.txt").exists()
