"""Registered models serve as they were evaluated, through a real ``mlflow models serve``.

Tiny real models (backbone, base, adapters) are registered with a sampling recipe (scheduler,
steps, guidance, residual weight). Checked: a one-condition version carries the recipe and an
input signature; ``mlflow models serve`` answers a REST request that gives only the condition map
and a seed with a PNG, and that PNG is byte for byte what the same model draws in-process when
the recipe is spelled out row by row (so the served defaults are the recipe, not the pyfunc's
built-in ones); a request that breaks the signature is refused. A combination of two champions
(``ctrlora-ops registry combine``) serves a two-condition request with the PNG the library draws
at the combination's recipe, and refuses a condition it lacks and a negative weight with a 400
that says so; the request table's checks are tested on their own, without a model.
"""
from __future__ import annotations

import base64
import contextlib
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
        assert [c.name for c in info.signature.inputs.inputs][:3] == ["condition_image", "condition", "weight"]

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
    with _served("models:/ctrlora-lighting@champion", env, tmp_path / "serve.log") as url:
        b64 = base64.b64encode(cond).decode()
        status, body = post_json(url, {"dataframe_split": {"columns": ["condition_image", "seed"],
                                                           "data": [[b64, 5]]}}, timeout=300)
        assert status == 200, body
        (row,) = body["predictions"]
        served = base64.b64decode(row["image"] if isinstance(row, dict) else row)
        assert served[:8] == b"\x89PNG\r\n\x1a\n"
        assert served == explicit  # served defaults = the recipe the version was evaluated with
        status, body = post_json(url, {"dataframe_split": {"columns": ["prompt"], "data": [["no map"]]}},
                                 timeout=300)
        assert status == 400 and "condition_image" in json.dumps(body)


@contextlib.contextmanager
def _served(model_uri: str, env: dict, log: Path):
    """A real ``mlflow models serve`` of ``model_uri`` on a free port; yields its invocations URL
    once it answers /ping, and stops the process group afterwards (also on failure)."""
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
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
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def _register_tiny(tmp_path: Path, conditions: list[str]) -> dict[str, str]:
    """Tiny real models under ``tmp_path/models`` and one registered champion per condition,
    each with :data:`RECIPE`; returns ``{condition: adapter dir}``."""
    from pipelines.registry.registration import register_adapter

    save_tiny_models(tmp_path, SIZE, [(c, 1, 7 + i) for i, c in enumerate(conditions)])
    models = tmp_path / "models"
    dirs = {}
    for i, c in enumerate(conditions):
        dirs[c] = str(models / "adapters" / f"{c}-1")
        res = register_adapter(c, dirs[c], dataset_hash=f"{i}" * 32 + ".dir", base_hash="b" * 64,
                               backbone_dir=models / "backbone", base_dir=models / "base",
                               metrics={"fidelity": 0.5}, git_commit="c0ffee", gate={"min_delta": 0.0},
                               recipe=RECIPE)
        assert res.decision == "champion"
    return dirs


def test_a_served_combination_draws_two_conditions_with_its_recipe(tmp_path, capsys):
    """``registry combine`` builds ctrlora+lighting+segmentation from the two champions, with the
    weights params ``evaluate.combined`` states; a real ``mlflow models serve`` of its champion
    answers a two-condition request (rows in any order) with the PNG the library draws in-process
    at that recipe, and refuses, with a 400 naming the problem, a condition the model lacks and a
    negative weight. ``ctrlora-ops generate --combination`` draws the same image."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from PIL import Image

    from ctrlora.sampling import CtrLoRAPipeline
    from pipelines import cli

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "test-combine",
           "CTRLORA_PARTS_CACHE": str(tmp_path / "parts"), "OMP_NUM_THREADS": "1"}
    combined = {"lighting": 1.5, "segmentation": 0.5}   # not the versions' own 2.0: the params decide
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"evaluate": {
        "sampling": {"scheduler": RECIPE["scheduler"], "steps": RECIPE["steps"]},
        "gate_guidance": RECIPE["guidance_scale"], "combined": combined}}))
    name = "ctrlora+lighting+segmentation"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        dirs = _register_tiny(tmp_path, ["lighting", "segmentation"])
        assert cli.main(["registry", "combine", "segmentation", "lighting", "--repo", str(repo)]) == 0
        client = MlflowClient()
        mv = client.get_model_version_by_alias(name, "champion")
        assert mv.tags["source.lighting"] == "models:/ctrlora-lighting/1"
        assert mv.tags["source.segmentation"] == "models:/ctrlora-segmentation/1"
        recipe = json.loads(mv.tags["recipe"])
        assert recipe == {"scheduler": RECIPE["scheduler"], "steps": RECIPE["steps"],
                          "guidance_scale": RECIPE["guidance_scale"], "weights": combined}
        assert "evaluate.combined" in mv.tags["weights_source"]
        card = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=str(tmp_path / "c")))
        text = (card / "artifacts" / "README.md").read_text()
        assert "`ctrlora-segmentation` v1" in text and mv.tags["adapter_hash.lighting"] in text
        # the same champions and recipe again: the same version, nothing new
        assert cli.main(["registry", "combine", "lighting", "segmentation", "--repo", str(repo)]) == 0
        assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [mv.version]
        # a combination of a condition without a champion is refused, naming it
        capsys.readouterr()
        assert cli.main(["registry", "combine", "lighting", "canny", "--repo", str(repo)]) == 1
        assert "ctrlora-canny has no 'champion' version" in capsys.readouterr().err
        # listed after the adapters (which the studio reads: combinations are not among them)
        from pipelines.registry.models import list_models

        assert {r["model"] for r in list_models()} == {"ctrlora-lighting", "ctrlora-segmentation"}
        assert cli.main(["registry", "list", "--json"]) == 0
        (row,) = [r for r in json.loads(capsys.readouterr().out) if r["model"] == name]
        assert row["aliases"] == ["champion"] and row["sources"]["lighting"] == "models:/ctrlora-lighting/1"
        assert cli.main(["registry", "resolve", f"models:/{name}@champion", "--dst", str(tmp_path / "r")]) == 0
        resolved = json.loads(capsys.readouterr().out)
        assert sorted(resolved["adapters"]) == ["lighting", "segmentation"]
        assert resolved["recipe"]["weights"] == combined

        # in-process, the library itself at the recipe: weighted sum of the two adapters' residuals
        pipe = CtrLoRAPipeline.from_pretrained_parts(tmp_path / "models/backbone", tmp_path / "models/base", dirs)
        maps = {"lighting": _png(1), "segmentation": _png(2)}

        def draw(weights: dict[str, float]) -> bytes:
            conds = {c: (Image.open(io.BytesIO(maps[c])).convert("RGB"), w) for c, w in weights.items()}
            out = pipe("", conditions=conds, num_inference_steps=RECIPE["steps"], scheduler=RECIPE["scheduler"],
                       guidance_scale=RECIPE["guidance_scale"], seed=5, output_type="pil", progress=False)
            buf = io.BytesIO()
            out.images[0].save(buf, format="PNG")
            return buf.getvalue()

        expected = draw(combined)
        assert expected != draw({"lighting": 1.5, "segmentation": 2.0})  # the weights matter

        # `ctrlora-ops generate --combination`: the same image, conditions given in any order
        for c in maps:
            (tmp_path / f"{c}.png").write_bytes(maps[c])
        assert cli.main(["generate", "--combination", f"models:/{name}@champion",
                         "--condition", f"segmentation={tmp_path / 'segmentation.png'}",
                         "--condition", f"lighting={tmp_path / 'lighting.png'}",
                         "--seed", "5", "--out", str(tmp_path / "gen")]) == 0
        drawn = sorted((tmp_path / "gen").glob("*.png"))[0]
        assert Image.open(drawn).tobytes() == Image.open(io.BytesIO(expected)).tobytes()

    # served: one request, two rows (segmentation first), nothing but the maps and a seed
    with _served(f"models:/{name}@champion", env, tmp_path / "serve.log") as url:
        b64 = {c: base64.b64encode(m).decode() for c, m in maps.items()}
        cols = ["request", "condition", "condition_image", "seed"]
        status, body = post_json(url, {"dataframe_split": {"columns": cols, "data": [
            [0, "segmentation", b64["segmentation"], 5], [0, "lighting", b64["lighting"], 5]]}}, timeout=300)
        assert status == 200, body
        (row,) = body["predictions"]
        assert row["request"] == 0
        assert base64.b64decode(row["image"]) == expected
        status, body = post_json(url, {"dataframe_split": {"columns": cols, "data": [
            [0, "lighting", b64["lighting"], 5], [0, "canny", b64["segmentation"], 5]]}}, timeout=60)
        assert status == 400 and "'canny' is not in this model" in body["message"], body
        assert "['lighting', 'segmentation']" in body["message"]
        status, body = post_json(url, {"dataframe_split": {"columns": cols + ["weight"], "data": [
            [0, "lighting", b64["lighting"], 5, -1.0]]}}, timeout=60)
        assert status == 400 and "must be finite and >= 0" in body["message"], body


def test_requests_are_checked_and_grouped_before_anything_is_drawn():
    """The request table of the pyfunc (no model needed): rows grouped into samples by
    ``request``, conditions put in the model's order, defaults from the recipe, and every
    malformed request refused with a message naming the row and the rule."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipelines.registry.pyfunc import plan_requests, recipe_of

    pair = ["lighting", "segmentation"]
    recipe = recipe_of({**RECIPE, "weights": {"lighting": 1.5, "segmentation": 0.5}}, pair)
    png = _png(3)
    (s,) = plan_requests(pd.DataFrame({"request": [7, 7], "condition": ["segmentation", "lighting"],
                                       "condition_image": [png, png], "weight": [float("nan"), 0.0]}), pair, recipe)
    assert (s.request, list(s.conditions), s.steps, s.scheduler) == (7, pair, RECIPE["steps"], RECIPE["scheduler"])
    assert [w for _, w in s.conditions.values()] == [0.0, 0.5]   # given 0, else the recipe's
    a, b = plan_requests(pd.DataFrame({"request": [1, 2], "condition": ["lighting", "segmentation"],
                                       "condition_image": [png, png], "seed": [3, 4]}), pair, recipe)
    assert (list(a.conditions), a.seed, list(b.conditions), b.seed) == (["lighting"], 3, ["segmentation"], 4)
    # one condition: its name may be left out, its recipe weight is the version's `weight`
    (one,) = plan_requests(pd.DataFrame({"condition_image": [png]}), ["lighting"], recipe_of(RECIPE, ["lighting"]))
    assert one.conditions["lighting"][1] == RECIPE["weight"] and one.request == 0

    def refused(frame: dict, match: str) -> None:
        with pytest.raises(MlflowException, match=match):
            plan_requests(pd.DataFrame(frame), pair, recipe)

    refused({"condition_image": [png]}, r"combines \['lighting', 'segmentation'\]; name each row's condition")
    refused({"condition": ["canny"], "condition_image": [png]}, r"'canny' is not in this model")
    refused({"request": [0, 0], "condition": ["lighting"] * 2, "condition_image": [png] * 2}, "given twice")
    refused({"request": [0, 0], "condition": pair, "condition_image": [png] * 2, "seed": [1, 2]},
            "different seed values")
    for bad in (float("inf"), -0.5):
        refused({"condition": ["lighting"], "condition_image": [png], "weight": [bad]}, "finite and >= 0")
    refused({"condition": ["lighting"], "condition_image": [png], "steps": [0]}, "steps must be >= 1")
    refused({"condition": ["lighting"], "condition_image": [png], "scheduler": ["euler"]}, "scheduler must be one of")
    refused({"condition": ["lighting"], "condition_image": [b"not a png"]}, "not a readable image")
