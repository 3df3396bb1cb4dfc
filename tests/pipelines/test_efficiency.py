"""The data-efficiency graph at toy scale: a real tiny backbone built from config, real rendered and
prepared scans (train / validation / test) with two new conditions, a real embed cache and
re-detectors, and the five stage entries (sweep, select, train, evaluate, report) run in-process
on two training steps. Also: the K -> tuned K map, the report on known numbers, and the DVC graph."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _models_helpers import perturb, tiny_eval_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
SIZE = 32
CONDITIONS = ["normal", "lighting"]
METHODS = ["adapter", "adapter_unet_copy", "full_finetune"]
KS, TUNE_K, HEADLINE_K = [2, 3, 8], [2, 8], [2, 3]
RATES = {"adapter": [1e-4, 1e-3, 1e-2], "adapter_unet_copy": [1e-4, 1e-3, 1e-2], "full_finetune": [1e-5, 1e-4, 1e-3]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Production artefacts at toy scale + a params file with an `efficiency` section."""
    from ctrlora.data.contract import ContractConfig
    from ctrlora.data.prepare import PrepareConfig, prepare
    from ctrlora.data.render import DatasetConfig, render_dataset
    from ctrlora.evaluation.detectors import save_detector, train_detector
    from ctrlora.evaluation.fidelity import default_detector_config
    from ctrlora.evaluation.loading import detector_targets, load_split
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.embed import build_embed_cache, save_embed_cache

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("efficiency")
    data = root / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=40, seed=3, resolution=SIZE, workers=1, progress=False))
    prepare(PrepareConfig(sources=(data / "rendered",), out=data / "prepared", data_root=data, test_fraction=0.25,
                          validation_fraction=0.25, conditions=tuple(CONDITIONS),
                          contract=ContractConfig(resolution=SIZE), workers=1, progress=False))
    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    bb.save(root / "backbone")
    save_embed_cache(build_embed_cache(bb.vae, bb.text_encoder, bb.tokenizer, data / "prepared", CONDITIONS,
                                       progress=False), data / "embed")
    base = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    perturb(base, 9)  # a "trained" base: not the UNet's copy
    base.save_pretrained(root / "base")
    for c in CONDITIONS:
        train = load_split(data / "prepared", "train", [c], progress=False)
        det = train_detector(default_detector_config(c, width=4, epochs=1), train.photos, detector_targets(c, train),
                             progress=False)
        save_detector(det, root / "detectors" / c)
    params = {
        "train_adapter": {"conditions": ["lighting", "normal"], "rank": 2, "prompt_dropout": 0.3, "max_pairs": 5,
                          "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 2, "seed": 0}},
        "evaluate": {"max_scans": 5, "sampling": {"steps": 1, "scheduler": "ddim", "batch_size": 8, "seed": 1000},
                     "gate_guidance": 1.0},
        # absolute paths: the stages resolve `paths` against the repo root, which leaves these as they are
        "paths": {"backbone": str(root / "backbone"), "embed": str(data / "embed"), "base": str(root / "base"),
                  "prepared": str(data / "prepared"), "detectors": str(root / "detectors"),
                  "efficiency": str(root / "models"), "reports": {"efficiency": str(root / "reports")},
                  "metrics": {"efficiency_selection": str(root / "metrics" / "efficiency_sweep.json"),
                              "efficiency": str(root / "metrics" / "efficiency.json")}},
        "efficiency": {"conditions": CONDITIONS, "methods": METHODS, "k": KS, "tune_k": TUNE_K,
                       "headline_k": HEADLINE_K, "learning_rates": RATES, "seeds": 2, "validation_scans": 4,
                       "n_boot": 200, "bootstrap_seed": 0, "workers": 1, "threads": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "params": params, "backbone": bb}


@pytest.fixture(scope="module")
def graph(world):
    """The five stages run in order on the toy world; records the splits each stage loads and, for
    every training, its K, seed and the training pairs the trainer kept."""
    from ctrlora.evaluation import loading
    from ctrlora.training import controlnet as trainer
    from pipelines.efficiency import evaluate as eff_evaluate
    from pipelines.efficiency import report as eff_report
    from pipelines.efficiency import select as eff_select
    from pipelines.efficiency import train as eff_train

    mp = pytest.MonkeyPatch()
    mp.setenv("CTRLORA_PARAMS", str(world["root"] / "params.yaml"))
    calls: list[tuple[str, str]] = []
    trainings: list[dict] = []
    real_split, real_train, real_loss = loading.load_split, trainer.train_condition, trainer.controlnet_loss

    def spy(stage):
        def load_split(root, split, *a, **k):
            calls.append((stage, split))
            return real_split(root, split, *a, **k)
        return load_split

    def train_condition(controlnet, unet, scheduler, cache, condition, cfg, mode="adapter", **kw):
        trainings.append({"condition": condition, "mode": mode, "max_pairs": kw.get("max_pairs"),
                          "seed": cfg.train.seed, "rows": None})
        return real_train(controlnet, unet, scheduler, cache, condition, cfg, mode=mode, **kw)

    def controlnet_loss(model, cache, scheduler, condition, rows, *a, **k):
        trainings[-1]["rows"] = sorted(int(r) for r in rows)  # the pairs this training draws its batches from
        return real_loss(model, cache, scheduler, condition, rows, *a, **k)

    mp.setattr(trainer, "train_condition", train_condition)
    mp.setattr(trainer, "controlnet_loss", controlnet_loss)
    stages = {}
    for stage, entry in (("sweep", lambda: eff_train.main(["sweep"])), ("select", eff_select.main),
                         ("train", lambda: eff_train.main(["train"])), ("evaluate", eff_evaluate.main),
                         ("report", eff_report.main)):
        mp.setattr(loading, "load_split", spy(stage))
        start = len(trainings)
        assert entry() == 0, stage
        stages[stage] = trainings[start:]
    mp.undo()
    return {**world, "calls": calls, "trainings": stages}


def _json(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- the K -> tuned K map
def test_each_k_takes_the_nearest_tuned_k_in_log_k():
    from pipelines.efficiency.common import nearest_tuned_k

    assert [nearest_tuned_k(k, [100]) for k in (30, 100, 300, 1000)] == [100] * 4       # the default
    assert [nearest_tuned_k(k, [30, 1000]) for k in (30, 100, 300, 1000)] == [30, 30, 1000, 1000]
    assert nearest_tuned_k(4, [2, 8]) == 2          # equally far in log K: the smaller tuned K
    assert [nearest_tuned_k(k, [30, 100, 300, 1000]) for k in (30, 100, 300, 1000)] == [30, 100, 300, 1000]


# ---------------------------------------------------------------------------- which split chooses what
def test_rates_are_chosen_on_validation_and_test_is_read_only_by_evaluate(graph):
    root, paths = graph["root"], graph["params"]["paths"]
    sweep = _json(root / "models" / "sweep" / "validation.json")
    assert sweep["split"] == "validation" and sweep["n_scans"] == {c: 4 for c in CONDITIONS}
    assert len(sweep["runs"]) == len(CONDITIONS) * len(TUNE_K) * 9 and {r["seed"] for r in sweep["runs"]} == {0}
    sel = _json(paths["metrics"]["efficiency_selection"])
    assert sel["split"] == "validation" and sel["tune_k"] == TUNE_K
    for c in CONDITIONS:
        for k in TUNE_K:
            for m in METHODS:
                runs = {r["learning_rate"]: r["mean"] for r in sweep["runs"]
                        if (r["condition"], r["k"], r["method"]) == (c, k, m)}
                assert sorted(runs) == sorted(RATES[m])
                best = max(sorted(runs), key=lambda r: (runs[r], -r))
                assert sel["tuned"][c][str(k)][m]["learning_rate"] == best, (c, k, m)
        # every K of the curve takes the choice of the nearest tuned K (3 -> 2 in log K) and its edge flag
        for k, t in ((2, 2), (3, 2), (8, 8)):
            for m in METHODS:
                got, tuned = sel["rates"][c][str(k)][m], sel["tuned"][c][str(t)][m]
                assert got == {"learning_rate": tuned["learning_rate"], "tuned_at_k": t, "at_edge": tuned["at_edge"]}
    assert ("sweep", "validation") in graph["calls"]
    assert {split for stage, split in graph["calls"] if stage in ("sweep", "select", "train")} == {"validation"}
    assert {stage for stage, split in graph["calls"] if split == "test"} == {"evaluate"}


# ---------------------------------------------------------------------------- which pairs each run sees
def test_each_run_trains_on_k_pairs_a_seed_dependent_nested_subset(graph):
    root = graph["root"]
    runs = graph["trainings"]["sweep"] + graph["trainings"]["train"]
    # sweep: every tuned K x method x rate; train: the rest of the curve (seed 0 at a tuned K is the sweep's)
    assert len(graph["trainings"]["sweep"]) == 36
    assert len(graph["trainings"]["train"]) == len(CONDITIONS) * len(METHODS) * (len(KS) * 2 - len(TUNE_K))
    for t in runs:
        assert len(t["rows"]) == t["max_pairs"] and t["max_pairs"] in KS, t
    subset = {}
    for t in runs:
        subset.setdefault((t["condition"], t["max_pairs"], t["seed"]), []).append(tuple(t["rows"]))
    for key, seen in subset.items():
        assert len(set(seen)) == 1, key  # one seed and K: every method and rate sees the same pairs
    for c in CONDITIONS:
        for s in (0, 1):
            small, mid, big = (set(subset[(c, k, s)][0]) for k in KS)
            assert small < mid < big  # nested within a seed
        assert subset[(c, 8, 0)] != subset[(c, 8, 1)]  # another seed draws other pairs
    dirs = list((root / "models" / "runs").glob("*/k*/*/lr_*/seed_*"))
    for d in dirs:
        info = _json(d / "run.json")
        assert info["max_pairs"] == int(d.parts[-4][1:]) and info["steps"] == 2 and info["batch_size"] == 2
    trained = {d.relative_to(root / "models" / "runs").as_posix() for d in dirs}
    assert not [t for t in trained if "/seed_0" in t and t.split("/")[1] in ("k2", "k8")]  # reused from the sweep
    assert len([t for t in trained if t.split("/")[1] == "k3"]) == len(CONDITIONS) * len(METHODS) * 2


# ---------------------------------------------------------------------------- what each method trains
def test_each_method_trains_the_right_parameters(graph):
    from ctrlora.models.adapters import read_adapter_config
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.baselines import load_run, read_run

    root, bb = graph["root"], graph["backbone"]
    assert {(t["mode"]) for t in graph["trainings"]["sweep"] if t["condition"] == "normal"} == {"adapter", "full"}
    base = CtrLoRAControlNet.from_pretrained(root / "base")
    runs = {m: root / "models" / "sweep" / "normal" / "k2" / m / f"lr_{RATES[m][1]:g}" / "seed_0" for m in METHODS}
    info = {m: read_run(d) for m, d in runs.items()}
    for m in ("adapter", "adapter_unet_copy"):
        assert info[m]["mode"] == "adapter" and info[m]["max_pairs"] == 2
        assert info[m]["trainable_params"] == read_adapter_config(runs[m] / "adapter")["num_params"], m
        assert info[m]["trainable_params"] < 0.5 * info[m]["total_params"], m
    assert not (runs["adapter"] / "controlnet").exists()  # the trained base is read from its own folder
    assert load_run(runs["adapter"], root / "base")[1] == "normal"
    copy_ = CtrLoRAControlNet.from_pretrained(runs["adapter_unet_copy"] / "controlnet")
    assert torch.equal(copy_.down_blocks[0].resnets[0].conv1.weight, bb.unet.down_blocks[0].resnets[0].conv1.weight)
    assert info["full_finetune"]["mode"] == "full"
    assert info["full_finetune"]["trainable_params"] == info["full_finetune"]["total_params"]
    ff = CtrLoRAControlNet.from_pretrained(runs["full_finetune"] / "controlnet")
    moved = [k for k, v in ff.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(moved) > 0.9 * len(base.state_dict())  # started from the base, every weight trained


# ---------------------------------------------------------------------------- test evaluation and report
def test_evaluate_and_report(graph):
    root, paths = graph["root"], graph["params"]["paths"]
    scores = _json(root / "models" / "test_scores.json")
    assert scores["split"] == "test" and scores["n_scans"] == {c: 5 for c in CONDITIONS}
    for c in CONDITIONS:
        assert len(scores["uncontrolled"][c]) == 5
        for k in KS:
            for m in METHODS:
                e = scores["runs"][c][str(k)][m]
                assert e["seeds"] == [0, 1] and e["train_seeds"] == [0, 1] and np.asarray(e["scores"]).shape == (2, 5)
    rep = _json(paths["metrics"]["efficiency"])
    assert rep["family_level"] == pytest.approx(1 - 0.05 / len(KS)) and rep["k"] == KS
    for c in CONDITIONS:
        for k in KS:
            point = rep["conditions"][c]["k"][str(k)]
            assert set(point["methods"]) == set(METHODS)
            assert point["methods"]["adapter"]["tuned_at_k"] == (2 if k in (2, 3) else 8)
            assert set(point["differences"]) == {"adapter - adapter_unet_copy", "adapter - full_finetune"}
            for d in point["differences"].values():
                fam = d["family"]
                assert d["level"] == 0.95 and fam["level"] == pytest.approx(1 - 0.05 / len(KS))
                # the family-wise interval holds the per-point one (strictly wider: the known-numbers test;
                # the toy's 2-step runs move fidelity by ~1e-6, below the report's rounding)
                assert fam["low"] <= d["low"] <= d["value"] <= d["high"] <= fam["high"]
    checks = rep["headline"]["checks"]
    assert set(checks) == {f"{c}@k{k}" for c in CONDITIONS for k in HEADLINE_K}
    for name, chk in checks.items():
        c, k = name.split("@k")
        d = rep["conditions"][c]["k"][k]["differences"]["adapter - adapter_unet_copy"]
        assert chk["low"] == d["family"]["low"] and chk["pass"] == (chk["low"] > 0)
    assert rep["headline"]["total"] == 4
    csv = (root / "reports" / "curve.csv").read_text().splitlines()
    assert csv[0] == "condition,k,method,fidelity,gain,gain_low,gain_high"
    assert len(csv) == 1 + len(CONDITIONS) * len(KS) * len(METHODS)
    assert (root / "reports" / "curve.png").stat().st_size > 0


def test_report_on_known_numbers():
    """The base helps at few pairs and not at many: adapter − UNet copy is +0.05 on every seed at
    K = 30 and 0 at K = 1000; the family-wise interval holds the per-point one and is wider."""
    from pipelines.efficiency.report import efficiency_report

    rng = np.random.default_rng(0)
    n, ks = 200, [30, 100, 300, 1000]
    unc = rng.uniform(0.2, 0.3, n)
    gains = {"adapter": [0.30, 0.33, 0.35, 0.36], "adapter_unet_copy": [0.25, 0.30, 0.34, 0.36],
             "full_finetune": [0.28, 0.33, 0.36, 0.37]}
    runs = {"normal": {str(k): {m: {"learning_rate": 1e-3, "scores": unc + g[i] + rng.normal(0, 0.02, (3, n))}
                                for m, g in gains.items()} for i, k in enumerate(ks)}}
    rep = efficiency_report({"normal": unc}, runs, list(gains), ks, [30, 100], n_boot=1000, seed=0)
    at = lambda k: rep["conditions"]["normal"]["k"][str(k)]  # noqa: E731
    assert at(30)["methods"]["adapter"]["gain"]["value"] == pytest.approx(0.30, abs=0.01)
    d30 = at(30)["differences"]["adapter - adapter_unet_copy"]
    assert d30["value"] == pytest.approx(0.05, abs=0.01) and d30["family"]["low"] > 0.02
    for k in ks:
        for d in at(k)["differences"].values():
            assert d["family"]["low"] < d["low"] and d["family"]["high"] > d["high"]
    chk = rep["headline"]["checks"]
    assert chk["normal@k30"]["pass"] and chk["normal@k30"]["low"] == d30["family"]["low"]
    assert rep["headline"]["total"] == 2
    d1000 = at(1000)["differences"]["adapter - adapter_unet_copy"]
    assert d1000["family"]["low"] < 0 < d1000["family"]["high"]
    # without the control's runs the headline cannot pass
    no_ctrl = {"normal": {k: {m: v for m, v in by_m.items() if m != "adapter_unet_copy"}
                          for k, by_m in runs["normal"].items()}}
    rep2 = efficiency_report({"normal": unc}, no_ctrl, ["adapter", "full_finetune"], ks, [30], n_boot=200)
    assert rep2["headline"]["checks"]["normal@k30"] == {"pass": False, "missing": "adapter_unet_copy"}


def test_params_are_checked(world, tmp_path, monkeypatch):
    from pipelines.efficiency.common import params

    for change, msg in ((("tune_k", [4]), "tune_k"),
                        (("learning_rates", {**RATES, "adapter": [1e-3, 1e-2]}), "at least 3"),
                        (("methods", ["adapter_unet_copy", "full_finetune"]), "include `adapter`"),
                        (("methods", ["adapter", "cnn"]), "hint CNN"),
                        (("conditions", ["depth"]), "train_adapter")):
        p = json.loads(json.dumps(world["params"]))
        p["efficiency"][change[0]] = change[1]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
        monkeypatch.setenv("CTRLORA_PARAMS", str(tmp_path / "params.yaml"))
        with pytest.raises(SystemExit, match=msg):
            params()


# ---------------------------------------------------------------------------- the DVC graph
def test_efficiency_graph_parses_and_production_graph_is_lean():
    out = subprocess.run([DVC, "stage", "list", "efficiency/dvc.yaml"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    names = [ln.split()[0] for ln in out.stdout.splitlines() if ln.strip()]
    assert names == [f"efficiency/dvc.yaml:{s}" for s in ("sweep", "select", "train", "evaluate", "report")]
    graph = yaml.safe_load((REPO / "efficiency" / "dvc.yaml").read_text())
    assert all(s.get("wdir") == ".." for s in graph["stages"].values())
    prod = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "pipelines.efficiency" not in (REPO / "dvc.yaml").read_text()
    prod_outs = [str(o) for s in prod.values() for o in (s.get("do", s).get("outs") or [])]
    assert not [o for o in prod_outs if "efficiency" in o]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    e = params["efficiency"]
    assert set(e["methods"]) == set(METHODS) and set(e["conditions"]) == {"normal", "lighting"}
    assert set(e["conditions"]) <= set(params["train_adapter"]["conditions"])
    assert set(e["conditions"]) <= set(params["detectors"]["conditions"])  # each has a re-detector
    assert e["k"] == [30, 100, 300, 1000] and set(e["tune_k"]) <= set(e["k"]) and set(e["headline_k"]) == {30, 100}
    assert e["seeds"] >= 3 and all(len(e["learning_rates"][m]) >= 3 for m in e["methods"])
    assert params["train_adapter"]["train"]["learning_rate"] in e["learning_rates"]["adapter"]
    assert "dvc repro efficiency/dvc.yaml" in (REPO / "Makefile").read_text()
