"""MLflow registry: tags tied to hashes, idempotency, gated champion, rollback, dvc.lock hashes,
the ``ctrlora-ops registry`` commands, and the registered pyfunc (logged as code, no pickle)
loading + generating in a fresh process. Real sqlite MLflow store and a real DVC repo in temp
dirs; no mocks."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One sqlite store for the module (creating its tables costs seconds); tests use distinct
    condition names so they do not see each other's models."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-register")
        mp.setenv("CTRLORA_PARTS_CACHE", str(root / "parts-cache"))  # fresh processes start empty
        yield uri


def _fake_parts(root: Path, condition: str, seed: int) -> dict[str, Path]:
    """Small stand-ins for backbone/base/adapter directories (registration only hashes and
    copies them; the fresh-process test below uses real tiny models)."""
    from safetensors.numpy import save_file

    from ctrlora.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    backbone, base, adapter = root / "backbone", root / "base", root / f"adapter-{seed}"
    for d in (backbone / "unet", base / "adapters" / "other", adapter):
        d.mkdir(parents=True, exist_ok=True)
    (backbone / "unet" / "config.json").write_text("{}")
    (base / "config.json").write_text("{}")
    (base / "adapters" / "other" / ADAPTER_WEIGHTS).write_bytes(b"x")
    save_file({"w": np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)},
              str(adapter / ADAPTER_WEIGHTS))
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({"condition": condition, "rank": 4}))
    return {"backbone_dir": backbone, "base_dir": base, "adapter_dir": adapter}


def _register(root, condition, seed, fidelity, dataset_hash="a" * 32 + ".dir"):
    from pipelines.registry.registration import register_adapter

    parts = _fake_parts(root, condition, seed)
    return register_adapter(
        condition, parts["adapter_dir"], dataset_hash=dataset_hash, base_hash="b" * 64,
        backbone_dir=parts["backbone_dir"], base_dir=parts["base_dir"],
        metrics={"fidelity": fidelity, "psnr": 20.0}, git_commit="c0ffee",
        gate={"min_delta": 0})


def test_registration_tags_input_and_idempotency(tracking, tmp_path):
    from mlflow import MlflowClient

    from ctrlora.models.adapters import ADAPTER_WEIGHTS
    from pipelines.registry import models as registry

    res = _register(tmp_path, "t-tags", seed=1, fidelity=0.5)
    assert res.created and res.version == "1" and res.decision == "champion" and res.champion == "1"
    client = MlflowClient()
    mv = client.get_model_version("ctrlora-t-tags", "1")
    weights = tmp_path / "adapter-1" / ADAPTER_WEIGHTS
    assert mv.tags["adapter_hash"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert mv.tags["dataset_hash"] == "a" * 32 + ".dir"
    assert mv.tags["base_hash"] == "b" * 64
    assert mv.tags["git_commit"] == "c0ffee"
    assert float(mv.tags["metric.fidelity"]) == 0.5 and float(mv.tags["metric.psnr"]) == 20.0
    run = client.get_run(res.run_id)
    assert run.data.params["condition"] == "t-tags"
    assert run.data.metrics["fidelity"] == 0.5
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == "a" * 32 + ".dir"
    # the registered artifacts: base without its base-condition adapters
    resolved = registry.resolve_adapter_uri("models:/ctrlora-t-tags@champion", tmp_path / "dl")
    assert (resolved.adapter / ADAPTER_WEIGHTS).read_bytes() == weights.read_bytes()
    assert (resolved.base / "config.json").is_file() and not (resolved.base / "adapters").exists()
    assert (resolved.backbone / "unet" / "config.json").is_file()

    again = _register(tmp_path, "t-tags", seed=1, fidelity=0.5)
    assert (again.version, again.created, again.decision) == ("1", False, "unchanged")
    assert len(client.search_model_versions("name='ctrlora-t-tags'")) == 1
    # no second registering run either (the backbone and base have runs of their own)
    assert len(client.search_runs([run.info.experiment_id], "tags.condition = 't-tags'")) == 1
    # same adapter bytes on the same base, while the prepared data moved on (a base condition's
    # adapter when the base waits for more data, base_refresh): the same model, no new version;
    # v1 keeps the dataset hash it was trained on
    same = _register(tmp_path, "t-tags", seed=1, fidelity=0.5, dataset_hash="d" * 32 + ".dir")
    assert (same.version, same.created, same.decision) == ("1", False, "unchanged")
    assert client.get_model_version("ctrlora-t-tags", "1").tags["dataset_hash"] == "a" * 32 + ".dir"
    # an adapter trained on the new data → a new version tied to it
    other = _register(tmp_path, "t-tags", seed=2, fidelity=0.5, dataset_hash="d" * 32 + ".dir")
    assert other.created and other.version == "2"
    assert client.get_model_version("ctrlora-t-tags", "2").tags["dataset_hash"] == "d" * 32 + ".dir"


def test_versions_say_whether_their_base_was_trained_or_imported(tracking, tmp_path):
    """``base_source.json`` (train_base's imported mode) becomes tags and a model-card row; no
    record: a trained base. A record of another base, or a broken one, refuses the version."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry.registration import base_provenance, model_card

    client = MlflowClient()
    trained = _register(tmp_path / "trained", "t-src", seed=1, fidelity=0.5)
    tags = client.get_model_version("ctrlora-t-src", trained.version).tags
    assert tags["base_source"] == "trained" and "base_checkpoint_sha256" not in tags

    sha = hashlib.sha256(b"published base").hexdigest()
    record = {"source": "imported", "checkpoint_sha256": sha, "checkpoint_format": "ckpt", "base_hash": "b" * 64,
              "discarded_stale_lora_keys": 4, "conditions": ["t-src"]}
    base = tmp_path / "imported" / "base"
    base.mkdir(parents=True)
    (base / "base_source.json").write_text(json.dumps(record))
    res = _register(tmp_path / "imported", "t-src", seed=2, fidelity=0.5)
    tags = client.get_model_version("ctrlora-t-src", res.version).tags
    assert (tags["base_source"], tags["base_checkpoint_sha256"], tags["base_checkpoint_format"]) == \
        ("imported", sha, "ckpt")
    assert tags["base_hash"] == "b" * 64
    card = Path(mlflow.artifacts.download_artifacts(f"runs:/{res.run_id}/model/artifacts/README.md",
                                                    dst_path=str(tmp_path / "card"))).read_text()
    (row,) = [line for line in card.splitlines() if line.startswith("| base ControlNet source |")]
    assert "imported" in row and sha in row and ".ckpt" in row
    assert "trained by this project" in model_card("x", dataset_hash="d", base_hash="b", adapter_hash="a",
                                                   git_commit="c", metrics=None, recipe=None,
                                                   base_source={"base_source": "trained"})

    # a record of another base: the base folder is not the adapter's, nothing is registered
    (base / "base_source.json").write_text(json.dumps({**record, "base_hash": "e" * 64}))
    with pytest.raises(ValueError, match=r"base_source\.json: records base_hash 'e+'.*trained on base 'b+'"):
        _register(tmp_path / "imported", "t-src", seed=3, fidelity=0.5)
    assert len(client.search_model_versions("name='ctrlora-t-src'")) == 2
    for broken, match in (("{not json", "not valid JSON"),
                          (json.dumps({**record, "checkpoint_sha256": "abc"}), "64 lowercase hex"),
                          (json.dumps({**record, "source": "trained"}), "'source' must be 'imported'"),
                          (json.dumps([record]), "expected a JSON object")):
        (base / "base_source.json").write_text(broken)
        with pytest.raises(ValueError, match=rf"base_source\.json: .*{match}"):
            base_provenance(base, "b" * 64)


def test_without_benchmark_only_first_version_is_champion_then_manual_promote_and_rollback(
        tracking, tmp_path):
    from mlflow import MlflowClient

    from pipelines.registry import models as registry

    client = MlflowClient()
    name = "ctrlora-t-gate"
    assert _register(tmp_path, "t-gate", 1, 0.50).decision == "champion"
    worse = _register(tmp_path, "t-gate", 2, 0.40)
    assert worse.decision == "challenger" and worse.champion == "1"
    assert "no frozen benchmark" in worse.reason and "champion kept" in worse.reason
    # stored numbers from another run never move the alias by themselves
    better = _register(tmp_path, "t-gate", 3, 0.60)
    assert better.decision == "challenger" and better.champion == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "3"

    # a person cannot promote on stored numbers: without a paired comparison it is refused
    from pipelines.registry.registration import promote

    with pytest.raises(registry.RegistryError, match="no paired comparison"):
        promote("t-gate", "3")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # a forced promotion needs a reason, and records it
    with pytest.raises(registry.RegistryError, match="reason"):
        promote("t-gate", "3", force=True, reason="  ")
    forced = promote("t-gate", "3", force=True, reason="reviewed the grids by hand")
    assert forced.promoted and forced.previous == "1" and "reviewed the grids by hand" in forced.reason
    tags = client.get_model_version(name, "3").tags
    assert tags["forced"] == "true" and tags["forced_reason"] == "reviewed the grids by hand"
    assert tags["forced_over"] == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"

    back = registry.rollback("t-gate")
    assert (back.version, back.previous) == ("1", "3")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert client.get_model_version(name, "3").tags["gate"] == "rolled_back"
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback("t-gate")

    rows = [r for r in registry.list_models() if r["model"] == name]
    assert [r["version"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["aliases"] == ["champion"] and rows[0]["metrics"]["fidelity"] == 0.5
    assert rows[2]["forced_reason"] == "reviewed the grids by hand"


def test_backbone_and_base_are_stored_once_and_fetched_by_hash(tracking, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.registry import models as registry

    monkeypatch.setenv("CTRLORA_PARTS_CACHE", str(tmp_path / "cache"))
    client = MlflowClient()
    for seed in (1, 2, 3):
        _register(tmp_path, "t-once", seed, 0.5)
    exp = client.get_experiment_by_name("test-register").experiment_id
    parts = {}
    for kind in registry.PARTS:
        runs = client.search_runs([exp], filter_string=f"tags.`{registry.PART_TAG}` = '{kind}'")
        digests = {r.data.tags[registry.HASH_TAG] for r in runs}
        parts[kind] = runs
        assert len(digests) == len(runs)  # one run per content hash, whatever the versions
    versions = [client.get_model_version("ctrlora-t-once", v) for v in ("1", "2", "3")]
    backbone_hash = registry.dir_hash(tmp_path / "backbone")
    assert {v.tags["backbone_content_hash"] for v in versions} == {backbone_hash}
    assert backbone_hash in {r.data.tags[registry.HASH_TAG] for r in parts["backbone"]}
    # a version's own artifacts: the adapter, the reference and the model card; no copy of
    # backbone or base
    model_files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(versions[0].run_id, "model/artifacts")}
    assert model_files == {"adapter", registry.PARTS_FILE, "README.md"}

    first = registry.resolve_adapter_uri("models:/ctrlora-t-once/1", tmp_path / "dl1")
    third = registry.resolve_adapter_uri("models:/ctrlora-t-once/3", tmp_path / "dl3")
    assert first.backbone == third.backbone and registry.dir_hash(first.backbone) == backbone_hash
    assert (first.backbone / "unet" / "config.json").is_file() and not (first.base / "adapters").exists()
    # a damaged cache copy is not handed out: fetched again and checked
    (first.backbone / "unet" / "config.json").write_text('{"tampered": true}')
    again = registry.resolve_adapter_uri("models:/ctrlora-t-once/2", tmp_path / "dl2")
    assert registry.dir_hash(again.backbone) == backbone_hash


def test_gate_settings_that_would_promote_a_worse_version_are_refused():
    from pipelines.registry.gate import gate_config, paired_decision

    with pytest.raises(ValueError, match="min_delta"):
        gate_config({"min_delta": -0.01})
    with pytest.raises(ValueError, match="margin"):
        gate_config({"rule": "noninferiority", "margin": -0.1})
    with pytest.raises(ValueError, match="unknown gate settings"):
        gate_config({"metric": "fidelity", "mode": "max"})  # the stored-means gate is gone
    # a tie never promotes, under either rule, whatever the interval says
    for gate in ({"rule": "superiority"}, {"rule": "noninferiority", "margin": 0.5}):
        ok, reason = paired_decision(gate, 0.0, 0.0, 0.0, champion_version="1", same_data=False, all_zero=True)
        assert not ok and "tie" in reason
    # an interval sitting exactly on min_delta is not above it
    assert not paired_decision({"min_delta": 0.0}, 0.0, 0.0, 0.0, champion_version="1", same_data=True)[0]


def test_a_stored_comparison_is_reused_only_at_its_weight():
    """A comparison is sampled at the challenger's recipe weight and records it (``gate_weight``);
    it decides a later promotion only at that same weight, and one recorded without a weight (made
    when every comparison sampled at 1) counts as weight 1."""
    from types import SimpleNamespace

    from pipelines.registry.gate import comparison_weight, recorded_weight
    from pipelines.registry.registration import _stored_outcome

    recipe = json.dumps({"scheduler": "dpm_karras", "steps": 10, "guidance_scale": 1.0, "weight": 2.0})
    assert comparison_weight({"recipe": recipe}, "v2") == 2.0
    assert comparison_weight({}, "v2") == 1.0                                  # no recipe: served at 1
    assert comparison_weight({"recipe": json.dumps({"steps": 10})}, "v2") == 1.0
    for bad, match in (("{not json", "v2: its recipe tag is not JSON"), ("[2]", "not a JSON object"),
                       (json.dumps({"weight": -1}), "finite number >= 0"),
                       (json.dumps({"weight": "2"}), "finite number >= 0")):
        with pytest.raises(ValueError, match=match):
            comparison_weight({"recipe": bad}, "v2")
    assert recorded_weight({}) == 1.0 and recorded_weight({"gate_weight": "2.0"}) == 2.0
    assert recorded_weight({"gate_weight": "two"}) is None and recorded_weight({"gate_weight": "nan"}) is None

    gate = {"rule": "superiority", "min_delta": 0.0}
    champion = SimpleNamespace(version="1", tags={"dataset_hash": "a"})
    stored = {"recipe": recipe, "dataset_hash": "b", "gate_champion_version": "1", "benchmark_version": "3",
              "gate_delta": "0.02", "gate_low": "0.01", "gate_high": "0.03", "gate_tie": "false",
              "gate_n_scans": "32", "gate_metric": "ssim"}
    at = lambda **tags: SimpleNamespace(version="2", tags={**stored, **tags})  # noqa: E731
    reused = _stored_outcome(gate, at(gate_weight="2.0"), champion, "3", 2.0)
    assert reused.promoted and "recorded at registration" in reused.reason and "residual weight 2" in reused.reason
    assert reused.tags == {"benchmark_version": "3", "gate_rule": "superiority", "gate_weight": "2.0"}
    assert _stored_outcome(gate, at(gate_weight="1.0"), champion, "3", 2.0) is None   # another weight
    assert _stored_outcome(gate, at(), champion, "3", 2.0) is None                    # no tag: weight 1
    assert _stored_outcome(gate, at(), champion, "3", 1.0).promoted                   # ... reused at 1
    assert _stored_outcome(gate, at(gate_weight="2.0"), champion, "4", 2.0) is None   # another benchmark
    assert _stored_outcome(gate, at(gate_weight="2.0"), SimpleNamespace(version="5", tags={}), "3", 2.0) is None


def test_ops_registry_commands(tracking, tmp_path, capsys):
    from importlib.metadata import entry_points

    from ctrlora.models.adapters import ADAPTER_WEIGHTS
    from pipelines.cli import main

    (entry,) = entry_points(group="console_scripts", name="ctrlora-ops")
    assert entry.load() is main
    _register(tmp_path, "t-cli", 1, 0.5)
    _register(tmp_path, "t-cli", 2, 0.4)
    assert main(["registry", "list", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["model"] == "ctrlora-t-cli"]
    assert [(r["version"], r["aliases"]) for r in rows] == [("1", ["champion"]), ("2", ["challenger"])]

    repo = tmp_path / "repo"  # a project with no frozen benchmark: no paired comparison to decide on
    repo.mkdir()
    (repo / "params.yaml").write_text("register:\n  gate: {rule: superiority, min_delta: 0.0}\n")
    assert main(["registry", "promote", "t-cli", "2", "--repo", str(repo)]) == 1
    assert "no paired comparison" in capsys.readouterr().err
    assert main(["registry", "promote", "t-cli", "2", "--force", "--repo", str(repo)]) == 1
    assert "--reason" in capsys.readouterr().err  # an override states its reason
    assert main(["registry", "promote", "t-cli", "2", "--force", "--reason", "checked by hand",
                 "--repo", str(repo)]) == 0
    assert "ctrlora-t-cli v2 promoted to champion" in capsys.readouterr().out
    assert main(["registry", "rollback", "t-cli"]) == 0
    assert "champion v2 -> v1" in capsys.readouterr().out
    assert main(["registry", "rollback", "t-nothing"]) == 1
    assert "no registered model ctrlora-t-nothing" in capsys.readouterr().err
    assert main(["registry", "resolve", "models:/ctrlora-t-cli@champion",
                 "--dst", str(tmp_path / "dl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "1" and (Path(out["adapter"]) / ADAPTER_WEIGHTS).is_file()


def _git_dvc_repo(root: Path) -> None:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for cmd in (["init", "-q"], ["config", "core.analytics", "false"],
                ["config", "core.site_cache_dir", ".dvc/site_cache"]):
        subprocess.run([sys.executable, "-m", "dvc", *cmd], cwd=root, check=True, env=env)


def test_dataset_hash_from_lock_reads_real_dvc_lock(tmp_path, monkeypatch):
    from dvc.repo import Repo

    from pipelines.registry.dvclock import dataset_hash_from_lock, dataset_hashes, lock_hash

    assert dataset_hashes(tmp_path) == {}  # before the first repro
    with pytest.raises(FileNotFoundError, match="no dvc.lock"):
        dataset_hash_from_lock(tmp_path, "lighting")

    _git_dvc_repo(tmp_path)
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          prepare:
            cmd: python -c "import os; [os.makedirs(f'data/prepared/conditions/{c}', exist_ok=True) or open(f'data/prepared/conditions/{c}/p.txt', 'w').write(c) for c in ('lighting', 'depth')]"
            outs:
              - data/prepared/conditions/lighting
              - data/prepared/conditions/depth
        """))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=tmp_path, check=True, env=env)
    monkeypatch.chdir(tmp_path)  # DVC resolves stage targets against the working directory
    with Repo(str(tmp_path)) as repo:
        (stage,) = repo.stage.collect("prepare")
        # DVC hashing the workspace directories now, independently of dvc.lock
        truth = {str(o.def_path).split("/")[-1]: o.get_hash().value for o in stage.outs}
    assert dataset_hash_from_lock(tmp_path, "lighting") == truth["lighting"]
    assert dataset_hash_from_lock(tmp_path, "depth") == truth["depth"]
    assert truth["lighting"] != truth["depth"] and truth["lighting"].endswith(".dir")
    assert dataset_hashes(tmp_path) == truth
    assert lock_hash(tmp_path, "./data/prepared/conditions/depth/") == truth["depth"]
    with pytest.raises(KeyError, match="segmentation"):
        dataset_hash_from_lock(tmp_path, "segmentation")


def test_pyfunc_is_logged_as_code_and_generates_in_fresh_process(tracking, tmp_path):
    import torch

    from ctrlora.models import adapters
    from _models_helpers import tiny_test_config

    from ctrlora.models.backbone import build_tiny_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from pipelines.registry.models import resolve_adapter_uri
    from pipelines.registry.registration import register_adapter

    torch.manual_seed(0)
    cfg = tiny_test_config(image_size=32, vae_block_out_channels=(32, 32),
                           unet_block_out_channels=(32, 32), unet_attention_heads=(2, 2),
                           unet_layers_per_block=1, text_layers=1)
    bb = build_tiny_backbone(cfg, ["a", "dental", "photo", "of", "teeth"])
    bb.save(tmp_path / "backbone")
    net = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=2 ** (len(cfg.vae_block_out_channels) - 1))
    net.save_pretrained(tmp_path / "base")
    adapters.add_adapter(net, "lighting", rank=2)
    adapters.save_adapter(net, "lighting", tmp_path / "adapter", base_hash=adapters.base_hash(net))

    res = register_adapter(
        "lighting", tmp_path / "adapter", dataset_hash="e" * 32 + ".dir",
        base_hash=adapters.base_hash(net), backbone_dir=tmp_path / "backbone",
        base_dir=tmp_path / "base", metrics={"fidelity": 0.3}, git_commit="c0ffee")
    assert res.decision == "champion"
    # models-from-code: the flavor names a python file instead of a pickled python_model
    local = resolve_adapter_uri("models:/ctrlora-lighting@champion", tmp_path / "dl").local_dir
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / Path(flavor["model_code_path"]).name).is_file()
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]

    script = textwrap.dedent("""\
        import io, sys
        import cloudpickle, mlflow.pyfunc, pandas as pd
        from PIL import Image
        def refuse(*args, **kwargs):
            raise AssertionError("loading the model unpickled something")
        cloudpickle.load = cloudpickle.loads = refuse
        model = mlflow.pyfunc.load_model("models:/ctrlora-lighting@champion")
        buf = io.BytesIO(); Image.new("RGB", (32, 32), (120, 80, 40)).save(buf, format="PNG")
        out = model.predict(pd.DataFrame({"condition_image": [buf.getvalue()],
                                          "prompt": ["a dental photo"], "steps": [2], "seed": [0]}))
        img = Image.open(io.BytesIO(out["image"][0]))
        print("SIZE", img.size, img.mode)
        """)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SIZE (32, 32) RGB" in proc.stdout


def test_params_state_the_recipe_and_the_benchmark_settings_once(tmp_path):
    """The recipe a version records and the settings of a new benchmark version come from
    params.yaml alone: the shipped file states every key, and a missing key is an error naming it."""
    from pipelines.registry.frozen_benchmark import BenchmarkError, benchmark_params
    from pipelines.registry.register import sampling_recipe

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shipped))
    assert benchmark_params(tmp_path) == shipped["register"]["benchmark"]
    del shipped["register"]["benchmark"]["sampling"]["guidance_scale"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shipped))
    with pytest.raises(BenchmarkError, match=r"register\.benchmark\.sampling\.guidance_scale is missing"):
        benchmark_params(tmp_path)

    ev = shipped["evaluate"]
    assert sampling_recipe(ev, "lighting") == {
        "scheduler": ev["sampling"]["scheduler"], "steps": ev["sampling"]["steps"],
        "guidance_scale": ev["gate_guidance"], "weight": ev["condition_weights"]["lighting"]}
    assert sampling_recipe(ev, "no-such-condition")["weight"] == 1.0   # as the evaluation weighs it
    assert sampling_recipe({}, "lighting") is None                      # a project without an evaluation
    with pytest.raises(ValueError, match=r"evaluate\.gate_guidance is missing"):
        sampling_recipe({k: v for k, v in ev.items() if k != "gate_guidance"}, "lighting")


def test_a_combination_recipe_and_what_cannot_be_combined(tracking, tmp_path):
    """The combination's weights: params ``evaluate.combined`` when it names exactly these
    conditions, else each version's own, ``--weight`` over both; one sampler for all. Refused with
    the reason: one condition, a condition twice, a condition without a champion, versions on
    different bases or backbones, weights that are negative or name another condition."""
    from pipelines.registry.combination import combination_recipe, combine
    from pipelines.registry.models import RegistryError
    from pipelines.registry.registration import register_adapter

    own = {"scheduler": "dpm_karras", "steps": 10, "guidance_scale": 1.0, "weight": 2.0}
    recipes = {"a": own, "b": {**own, "weight": 3.0}}
    recipe, source = combination_recipe(["a", "b"], recipes, {"combined": {"a": 1.0, "b": 0.5}})
    assert recipe == {"scheduler": "dpm_karras", "steps": 10, "guidance_scale": 1.0, "weights": {"a": 1.0, "b": 0.5}}
    assert "evaluate.combined" in source
    recipe, source = combination_recipe(["a", "b"], recipes, {"combined": {"a": 1.0, "c": 1.0}}, {"b": "0"})
    assert recipe["weights"] == {"a": 2.0, "b": 0.0} and "not evaluated together" in source
    for weights, match in (({"a": -1}, "finite and >= 0"), ({"a": "inf"}, "finite and >= 0"),
                           ({"c": 1}, "'c' is not one of the conditions")):
        with pytest.raises(RegistryError, match=match):
            combination_recipe(["a", "b"], recipes, {}, weights)
    with pytest.raises(RegistryError, match="different samplers"):
        combination_recipe(["a", "b"], {"a": own, "b": {**own, "steps": 20}}, {})

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"evaluate": {
        "sampling": {"scheduler": "ddim", "steps": 2}, "gate_guidance": 1.0}}))
    _register(tmp_path / "a", "t-mix-a", 1, 0.5)
    other_base = _fake_parts(tmp_path / "b", "t-mix-b", 2)
    register_adapter("t-mix-b", other_base["adapter_dir"], dataset_hash="a" * 32 + ".dir", base_hash="c" * 64,
                     backbone_dir=other_base["backbone_dir"], base_dir=other_base["base_dir"], metrics=None,
                     git_commit="c0ffee")
    other_backbone = _fake_parts(tmp_path / "c", "t-mix-c", 3)
    (other_backbone["backbone_dir"] / "unet" / "config.json").write_text('{"other": 1}')
    register_adapter("t-mix-c", other_backbone["adapter_dir"], dataset_hash="a" * 32 + ".dir", base_hash="b" * 64,
                     backbone_dir=other_backbone["backbone_dir"], base_dir=other_backbone["base_dir"], metrics=None,
                     git_commit="c0ffee")
    for conditions, match in ((["t-mix-a"], "two or more conditions"), (["t-mix-a", "t-mix-a"], "given twice"),
                              (["t-mix-a", "t-none"], "ctrlora-t-none has no 'champion' version"),
                              (["t-mix-a", "t-mix-b"], "different base ControlNets"),
                              (["t-mix-a", "t-mix-c"], "different backbones")):
        with pytest.raises(RegistryError, match=match):
            combine(conditions, root=repo)


def test_a_combination_is_listed_and_rolled_back_from_the_cli(tracking, tmp_path, capsys):
    """``registry list`` shows a combination as its own kind with its source versions and
    weights; ``registry rollback`` takes a combination (its conditions, ``c1+c2`` or its model
    name) and walks its champion back like a condition's."""
    from mlflow import MlflowClient

    from pipelines.cli import main
    from pipelines.registry.registration import promote

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"evaluate": {
        "sampling": {"scheduler": "ddim", "steps": 2}, "gate_guidance": 1.0,
        "condition_weights": {"t-rb-a": 1.5}}}))
    name = "ctrlora+t-rb-a+t-rb-b"
    _register(tmp_path, "t-rb-a", 1, 0.5)
    _register(tmp_path, "t-rb-b", 2, 0.5)
    assert main(["registry", "combine", "t-rb-b", "t-rb-a", "--repo", str(repo)]) == 0
    _register(tmp_path, "t-rb-a", 3, 0.6)
    assert promote("t-rb-a", "2", force=True, reason="reviewed by hand").promoted
    assert main(["registry", "combine", "t-rb-a", "t-rb-b", "--repo", str(repo)]) == 0
    capsys.readouterr()
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    assert main(["registry", "list"]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.split()[:3] == ["combination", name, "2"]]
    assert "champion" in line and "ctrlora-t-rb-a/2 (1.5)" in line and "ctrlora-t-rb-b/1 (1.0)" in line
    assert "ddim, 2 steps, guidance 1.0" in line
    assert main(["registry", "list", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["model"] in (name, "ctrlora-t-rb-a")]
    assert {r["kind"] for r in rows if r["model"] == name} == {"combination"}
    assert {r["kind"] for r in rows if r["model"] != name} == {"adapter"}
    assert [(r["version"], r["weights"], r["sources"]["t-rb-a"]) for r in rows if r["model"] == name] == [
        ("1", {"t-rb-a": 1.5, "t-rb-b": 1.0}, "models:/ctrlora-t-rb-a/1"),
        ("2", {"t-rb-a": 1.5, "t-rb-b": 1.0}, "models:/ctrlora-t-rb-a/2")]

    assert main(["registry", "rollback", "t-rb-b", "t-rb-a"]) == 0
    assert f"{name}: champion v2 -> v1" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert client.get_model_version(name, "2").tags["gate"] == "rolled_back"
    # the adapter's own champion did not move
    assert str(client.get_model_version_by_alias("ctrlora-t-rb-a", "champion").version) == "2"
    for spec in ([name], ["t-rb-a+t-rb-b"]):
        assert main(["registry", "rollback", *spec]) == 1
        assert f"{name}: champion v1 has no previous champion" in capsys.readouterr().err
    for spec, error in ((["t-rb-a", "t-rb-a"], "given twice"),
                        (["t-rb-a", "t-nothing"], "no registered model ctrlora+t-nothing+t-rb-a"),
                        ([f"models:/{name}@champion"], "name the combination, not a URI")):
        assert main(["registry", "rollback", *spec]) == 1
        assert error in capsys.readouterr().err
