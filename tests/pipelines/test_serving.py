"""A registered version serves as it was evaluated, through a real ``mlflow models serve``.

Tiny real models (backbone, base, one lighting adapter) are registered with a sampling recipe
(scheduler, steps, guidance, residual weight). Checked: the version carries the recipe and an
input signature; ``mlflow models serve`` answers a REST request that gives only the condition map
and a seed with a PNG, and that PNG is byte for byte what the same model draws in-process when
the recipe is spelled out row by row (so the served defaults are the recipe, not the pyfunc's
built-in ones); a request that breaks the signature is refused.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from _models_helpers import save_tiny_models  # noqa: E402
from _project_helpers import post_json  # noqa: E402

SIZE = 32
RECIPE = {"scheduler": "dpm_karras", "steps": 3, "guidance_scale": 1.0, "weight": 2.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_a_served_version_samples_with_the_recipe_it_was_evaluated_with(tmp_path):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pipelines.registry.registration import register_adapter

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "test-serving",
           "CTRLORA_PARTS_CACHE": str(tmp_path / "parts"), "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        save_tiny_models(tmp_path, SIZE, [("lighting", 1, 7)])
        models = tmp_path / "models"
        res = register_adapter("lighting", models / "adapters" / "lighting-1", dataset_hash="a" * 32 + ".dir",
                               base_hash="b" * 64, backbone_dir=models / "backbone", base_dir=models / "base",
                               metrics={"fidelity": 0.5, "metric": "ssim", "n_scans": 10,
                                        "gain": {"value": 0.3, "low": 0.2, "high": 0.4, "level": 0.95}},
                               git_commit="c0ffee", gate={"min_delta": 0.0}, recipe=RECIPE)
        assert res.decision == "champion"
        mv = MlflowClient().get_model_version("ctrlora-lighting", res.version)
        assert json.loads(mv.tags["recipe"]) == RECIPE
        card = Path(mlflow.artifacts.download_artifacts(f"runs:/{res.run_id}/model/artifacts/{'README.md'}",
                                                        dst_path=str(tmp_path / "card")))
        text = card.read_text()
        assert "# ctrlora-lighting" in text and "a" * 32 + ".dir" in text and "dpm_karras" in text
        assert "Intended use and limits" in text and "+0.3000 [+0.2000, +0.4000]" in text
        info = mlflow.models.get_model_info("models:/ctrlora-lighting@champion")
        assert info.signature is not None
        assert [c.name for c in info.signature.inputs.inputs][:2] == ["condition_image", "prompt"]

        # in-process, the recipe spelled out on the row
        model = mlflow.pyfunc.load_model("models:/ctrlora-lighting@champion")
        cond = _png(1)
        explicit = model.predict(pd.DataFrame({"condition_image": [cond], "seed": [5], "steps": [RECIPE["steps"]],
                                               "scheduler": [RECIPE["scheduler"]], "weight": [RECIPE["weight"]],
                                               "guidance_scale": [RECIPE["guidance_scale"]]}))["image"].iloc[0]
        other = model.predict(pd.DataFrame({"condition_image": [cond], "seed": [5], "steps": [RECIPE["steps"]],
                                            "scheduler": [RECIPE["scheduler"]], "weight": [1.0],
                                            "guidance_scale": [RECIPE["guidance_scale"]]}))["image"].iloc[0]
        assert explicit != other  # the weight matters, so the comparison below can tell

        # `ctrlora-ops generate` from the registry: unset steps, guidance, sampler and weight come
        # from the version's recipe, and the image is the recipe's
        from PIL import Image

        from pipelines import cli

        (tmp_path / "cond.png").write_bytes(cond)
        rc = cli.main(["generate", "--adapter", "lighting=models:/ctrlora-lighting@champion",
                       "--condition", f"lighting={tmp_path / 'cond.png'}", "--seed", "5",
                       "--out", str(tmp_path / "gen")])
        assert rc == 0
        record = json.loads((tmp_path / "gen" / "generate.json").read_text())
        assert (record["steps"], record["guidance"], record["scheduler"]) == (
            RECIPE["steps"], RECIPE["guidance_scale"], RECIPE["scheduler"])
        drawn = sorted((tmp_path / "gen").glob("*.png"))[0]
        assert (Image.open(drawn).tobytes() == Image.open(io.BytesIO(explicit)).tobytes())

    # the same version behind a real `mlflow models serve`, given only the map and a seed
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/ctrlora-lighting@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")  # uvicorn
        proc = subprocess.Popen(cmd, env={**os.environ, **env, "PATH": path}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow models serve did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        b64 = base64.b64encode(cond).decode()
        status, body = post_json(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_split": {"columns": ["condition_image", "seed"], "data": [[b64, 5]]}}, timeout=300)
        assert status == 200, body
        (row,) = body["predictions"]
        served = base64.b64decode(row["image"] if isinstance(row, dict) else row)
        assert served[:8] == b"\x89PNG\r\n\x1a\n"
        assert served == explicit  # served defaults = the recipe the version was evaluated with
        status, body = post_json(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_split": {"columns": ["prompt"], "data": [["no map"]]}}, timeout=300)
        assert status == 400 and "condition_image" in json.dumps(body)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
