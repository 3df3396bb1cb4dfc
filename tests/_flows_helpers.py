"""A toy project for the Prefect flow tests: a temp git + DVC repo whose dvc.yaml has the shape of
the real graph (prepare -> backbone -> train@<condition> -> evaluate) with fast Python stages, and
whose prepare reads the accepted store ``data/scans`` like the real one. Real scans land through
``ctrlora.cli render`` and are ingested by the real ``pipelines.orchestration.ingest``.

Failures can be injected through the environment the stages inherit: ``TEST_FAIL_PREPARE=1``,
``TEST_FAIL_ALWAYS=<condition>`` (train@<condition> always fails), ``TEST_FLAKY_MARKER=<file>`` +
``TEST_FLAKY_STAGE=<condition>`` (fails once)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STAGES = ["backbone", "prepare", "train@depth", "train@lighting", "evaluate"]
CONDITIONS = ["lighting", "depth"]

PREPARE = """\
import os, sys, yaml
p = yaml.safe_load(open("params.yaml"))["prepare"]
if os.environ.get("TEST_FAIL_PREPARE"):
    sys.exit("boom: injected failure in prepare")
scans = sorted(d for d in os.listdir("data/scans") if not d.startswith("."))
for c in p["conditions"]:
    os.makedirs(f"data/prepared/conditions/{c}", exist_ok=True)
    with open(f"data/prepared/conditions/{c}/pairs.jsonl", "w") as fh:
        fh.write(open("src/scans.txt").read() + "".join(s + "\\n" for s in scans) + c + "\\n")
"""
BACKBONE = """\
import os
for d in ("models/backbone/unet", "models/base"):
    os.makedirs(d, exist_ok=True)
open("models/backbone/unet/config.json", "w").write("{}")
open("models/base/config.json", "w").write("{}")
"""
TRAIN = """\
import hashlib, json, os, sys
c = sys.argv[1]
if os.environ.get("TEST_FAIL_ALWAYS") == c:
    sys.exit(f"boom: injected permanent failure in train@{c}")
flaky = os.environ.get("TEST_FLAKY_MARKER")
if flaky and os.environ.get("TEST_FLAKY_STAGE") == c and not os.path.exists(flaky):
    open(flaky, "w").write("failed once")
    sys.exit(f"transient failure injected in train@{c}")
data = open(f"data/prepared/conditions/{c}/pairs.jsonl", "rb").read()
os.makedirs(f"models/adapters/{c}", exist_ok=True)
open(f"models/adapters/{c}/adapter_model.safetensors", "wb").write(hashlib.sha256(data).digest())
json.dump({"condition": c, "rank": 2, "base_hash": "f" * 64}, open(f"models/adapters/{c}/adapter_config.json", "w"))
"""
EVALUATE = """\
import json, os
os.makedirs("metrics", exist_ok=True)
json.dump({c: {"fidelity": 0.5 + 0.1 * i} for i, c in enumerate(sorted(
          d for d in os.listdir("models/adapters") if os.path.isdir(f"models/adapters/{d}")))},
          open("metrics/evaluate.json", "w"))
"""
DVC_YAML = """\
stages:
  prepare:
    cmd: python src/prepare.py
    deps: [src/prepare.py, src/scans.txt, data/scans]
    params: [prepare]
    outs:
      - data/prepared/conditions/lighting
      - data/prepared/conditions/depth
  backbone:
    cmd: python src/backbone.py
    deps: [src/backbone.py]
    outs: [models/backbone, models/base]
  train:
    foreach: [lighting, depth]
    do:
      cmd: python src/train.py ${item}
      deps: [src/train.py, "data/prepared/conditions/${item}", models/base]
      outs: ["models/adapters/${item}"]
  evaluate:
    cmd: python src/evaluate.py
    deps: [src/evaluate.py, models/adapters/lighting, models/adapters/depth]
    metrics: [metrics/evaluate.json: {cache: false}]
"""
PARAMS = """\
paths:
  data: data
  incoming: data/incoming
  scans: data/scans
  quarantine: data/quarantine
prepare:
  resolution: 64
  conditions: [lighting, depth]
flows:
  retries: 0
  retry_delay_seconds: 0
  prepare_stage: prepare
schedule:
  cron: null
  interval: 86400
  poll_seconds: 10
register:
  gate: {min_delta: 0}
"""


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(cmd, cwd=cwd, check=True, env=env, capture_output=True, text=True)


def make_toy_repo(root: Path) -> Path:
    """The toy project at ``root`` (created), committed, DVC analytics off."""
    (root / "src").mkdir(parents=True)
    for name, text in {"prepare.py": PREPARE, "backbone.py": BACKBONE, "train.py": TRAIN,
                       "evaluate.py": EVALUATE}.items():
        (root / "src" / name).write_text(text)
    (root / "src" / "scans.txt").write_text("scan-001\n")  # the rendered part of the data set
    (root / "data" / "scans").mkdir(parents=True)
    (root / "data" / "scans" / ".gitkeep").write_text("")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS)
    # a research graph beside the production one: the production flow must never run it
    (root / "research").mkdir()
    (root / "research" / "dvc.yaml").write_text(
        "stages:\n  ablation:\n    cmd: python -c \"raise SystemExit('research ran')\"\n"
        "    wdir: ..\n    deps: [models/adapters/lighting]\n    outs: [models/research]\n")
    run(["git", "init", "-q"], root)
    for args in (["init", "-q"], ["config", "core.analytics", "false"],
                 ["config", "core.site_cache_dir", ".dvc/site_cache"]):
        run([sys.executable, "-m", "dvc", *args], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


def land_scans(root: Path, n: int, seed: int) -> list[str]:
    """``n`` real rendered scans landed in ``data/incoming/`` (each written with READY last)."""
    incoming = root / "data" / "incoming"
    before = set(os.listdir(incoming)) if incoming.is_dir() else set()
    run([sys.executable, "-m", "ctrlora.cli", "render", "--out", str(incoming), "--n", str(n),
         "--seed", str(seed), "--workers", "1", "--no-progress"], root)
    return sorted(set(os.listdir(incoming)) - before)
