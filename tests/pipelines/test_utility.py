"""The utility graph at toy scale: real rendered and prepared scans (train / validation / test), a
real tiny backbone and base with a segmentation adapter, and the six stage entries (generate,
sweep, select, seeds, evaluate, audit) run in-process with a few segmenter steps. Checks which
split each stage reads, that the pool's masks never reach a real subset, and what the metrics hold."""
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
from _models_helpers import perturb, randomize_adapter, tiny_eval_backbone  # noqa: E402

pytest.importorskip("monai")

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
SIZE = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ctrlora.data.contract import ContractConfig
    from ctrlora.data.prepare import PrepareConfig, prepare
    from ctrlora.data.render import DatasetConfig, render_dataset
    from ctrlora.models import adapters
    from ctrlora.models.controlnet import CtrLoRAControlNet

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("utility")
    data = root / "data"
    render_dataset(DatasetConfig(out=data / "rendered", n=44, seed=5, resolution=SIZE, workers=1, progress=False))
    (data / "scans").mkdir()
    prepare(PrepareConfig(sources=(data / "rendered",), out=data / "prepared", data_root=data, test_fraction=0.2,
                          validation_fraction=0.2, conditions=("segmentation",),
                          contract=ContractConfig(resolution=SIZE), workers=1, progress=False))
    torch.manual_seed(0)
    bb = tiny_eval_backbone(SIZE)
    bb.save(root / "backbone")
    cn = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
    perturb(cn, 2)
    cn.save_pretrained(root / "base")
    adapters.add_adapter(cn, "segmentation", rank=2, own_modules=True)
    randomize_adapter(cn, "segmentation", seed=1, scale=0.5)
    adapters.save_adapter(cn, "segmentation", root / "base" / "adapters" / "segmentation", adapters.base_hash(cn))
    params = {
        "evaluate": {"sampling": {"steps": 2, "scheduler": "ddim", "batch_size": 8, "seed": 1000},
                     "gate_guidance": 1.0, "condition_weights": {"segmentation": 2.0}},
        "paths": {"backbone": str(root / "backbone"), "base": str(root / "base"), "adapters": str(root / "adapters"),
                  "prepared": str(data / "prepared"), "rendered": str(data / "rendered"), "scans": str(data / "scans"),
                  "utility": str(root / "models"), "utility_data": str(data / "utility"),
                  "reports": {"utility": str(root / "reports")},
                  "metrics": {m: str(root / "metrics" / f"{m}.json")
                              for m in ("utility_selection", "utility", "utility_audit")}},
        "utility": {"condition": "segmentation", "n_real": [2, 4], "curve_extra": [8], "headline_n": 4,
                    "arms": ["real", "real_aug", "real_gen", "real_gen_uncontrolled", "real_aug_gen"], "pool": 6, "m_grid": [3, 6],
                    "generation_seed": 7, "subset_seed": 0, "seeds": 2, "validation_scans": None, "test_scans": None,
                    "segmenter": {"channels": [8, 16], "strides": [2], "num_res_units": 0, "steps": 3,
                                  "batch_size": 4, "learning_rate": 1e-2, "weight_decay": 0.0, "real_share": 0.5},
                    "audit": {"percentile": 5.0, "grid_pairs": 3}, "n_boot": 100, "bootstrap_seed": 0,
                    "workers": 1, "threads": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "params": params}


@pytest.fixture(scope="module")
def graph(world):
    """The six stages in order on the toy world; records the splits each one loads."""
    from ctrlora.evaluation import loading
    from pipelines.utility import audit, evaluate, generate, select, train

    mp = pytest.MonkeyPatch()
    mp.setenv("CTRLORA_PARAMS", str(world["root"] / "params.yaml"))
    calls: list[tuple[str, str]] = []
    real = loading.load_split

    def spy(stage):
        def load_split(root, split, *a, **k):
            calls.append((stage, split))
            return real(root, split, *a, **k)
        return load_split

    for stage, entry in (("generate", generate.main), ("sweep", lambda: train.main(["sweep"])),
                         ("select", select.main), ("seeds", lambda: train.main(["seeds"])),
                         ("evaluate", evaluate.main), ("audit", audit.main)):
        mp.setattr(loading, "load_split", spy(stage))
        assert entry() == 0, stage
    yield {**world, "calls": calls}
    mp.undo()


def _json(path):
    return json.loads(Path(path).read_text())


def test_test_split_is_read_only_by_evaluate_and_audit(graph):
    reads = {}
    for stage, split in graph["calls"]:
        reads.setdefault(stage, set()).add(split)
    assert reads["generate"] == {"train"}
    assert reads["sweep"] == {"train", "validation"} and reads["seeds"] == {"train"}
    assert "test" in reads["evaluate"] and "test" in reads["audit"]
    assert "select" not in reads  # select reads the sweep's validation scores only


def test_pool_masks_never_reach_a_real_subset(graph, monkeypatch):
    from ctrlora.evaluation.loading import load_split
    from pipelines.utility import common as C

    monkeypatch.setenv("CTRLORA_PARAMS", str(graph["root"] / "params.yaml"))
    p = C.params()
    train = load_split(p["paths"]["prepared"], "train", ["segmentation"], [p["paths"]["rendered"]], progress=False)
    pool = set(_json(p["paths"]["utility_data"] / "pool.json")["scan_ids"])
    assert len(pool) == 6
    for seed in (0, 1):
        for n in (2, 4, 8):
            assert not pool & set(C.real_ids(p, train.scan_ids, n, seed))
        assert set(C.real_ids(p, train.scan_ids, 2, seed)) <= set(C.real_ids(p, train.scan_ids, 4, seed))
    assert C.real_ids(p, train.scan_ids, 4, 0) != C.real_ids(p, train.scan_ids, 4, 1)
    z = C.read_pool(p)
    assert z["controlled"].shape == z["uncontrolled"].shape == (6, SIZE, SIZE, 3)
    assert not np.array_equal(z["controlled"], z["uncontrolled"])  # the control acts
    ids = [train.scan_ids[i] for i in z["source"]]
    assert set(ids) == pool
    np.testing.assert_array_equal(z["labels"], train.labels[z["source"]])  # labelled by their own masks


def test_selection_and_metrics(graph):
    root = graph["root"]
    sel = _json(root / "metrics" / "utility_selection.json")
    assert sel["split"] == "validation"
    for n in ("2", "4"):
        assert {sel["chosen"][n][a]["m"] for a in ("real_gen", "real_gen_uncontrolled", "real_aug_gen")} <= {3, 6}
    assert set(sel["chosen"]["8"]) == {"real"}
    for s in (0, 1):  # seed 0 from the sweep, seed 1 trained by `seeds`, at the chosen M
        m = sel["chosen"]["4"]["real_gen"]["m"]
        assert (root / "models" / ("sweep" if s == 0 else "seeds") / "n4" / f"real_gen_m{m}" / f"seed_{s}"
                / "model.safetensors").is_file()
    met = _json(root / "metrics" / "utility.json")
    head = met["headline"]
    assert head["n"] == 4 and set(head["checks"]) == {"gain_above_zero", "above_uncontrolled_control"}
    assert {"vs_real_gen_uncontrolled", "vs_real_aug", "augmented_vs_real_aug", "worth"} <= set(head)
    g = met["n"]["4"]["real_gen"]
    assert g["gain"]["low"] <= g["gain"]["value"] <= g["gain"]["high"]
    assert g["gain_family"]["low"] <= g["gain"]["low"]  # the family-wise interval is the wider one
    assert len(g["per_seed"]) == 2 and "worth" in g
    scores = _json(root / "models" / "test_scores.json")
    assert len(scores["runs"]["4/real"][0]) == met["test_scans"] == len(scores["scan_ids"])
    for f in ("curve.png", "predictions.png", "generated.png", "closest_pairs.png", "closest_pairs_latent.png"):
        assert (root / "reports" / f).stat().st_size > 0, f
    audit = _json(root / "metrics" / "utility_audit.json")
    for space in ("pixel", "latent"):
        for kind in ("controlled", "uncontrolled"):
            s = audit[space][kind]
            assert 0.0 <= s["generated_share"]["value"] <= 1.0 and s["n_generated"] == 6
            assert "nearest_is_source" in s["source"]


def test_utility_graph_parses_and_is_its_own_target():
    out = subprocess.run([DVC, "stage", "list", "utility/dvc.yaml"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names == [f"utility/dvc.yaml:{s}" for s in ("generate", "sweep", "select", "seeds", "evaluate", "audit")]
    assert "dvc repro utility/dvc.yaml" in (REPO / "Makefile").read_text()
    prod = subprocess.run([DVC, "stage", "list", "dvc.yaml"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    assert "utility" not in prod  # `make repro` never runs it
