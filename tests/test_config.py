"""One config surface: every library config that a params.yaml section feeds is built from that
section by one builder, strictly. The repo's own params.yaml builds every one of them (no key
missing, none unknown), and each builder family refuses a section with a key too many or too few,
naming the section and the key."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from ctrlora.params import ParamsKeyError, checked_section, load_params, read_sections

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


# ---------------------------------------------------------------------------- the builders
def _render(p):
    from ctrlora.data.render import DatasetConfig

    return DatasetConfig.from_params(p["render"], out=REPO / "data" / "rendered")


def _prepare(p):
    from ctrlora.data.prepare import PrepareConfig

    return PrepareConfig.from_params(p["prepare"], sources=("data/rendered", "data/scans"), out="data/prepared",
                                     data_root="data")


def _train_base(p):
    from pipelines.stages.train_base import train_config

    return train_config(p["train_base"])


def _train_adapter(p):
    from ctrlora.training.baselines import Recipe

    return Recipe.from_params(p["train_adapter"])


def _evaluate(p):
    from ctrlora.evaluation.run import EvalConfig
    from pipelines.stages.evaluate import OWN_KEYS

    return EvalConfig.from_params(p["evaluate"], p["train_base"]["conditions"], p["train_adapter"]["conditions"],
                                  also=OWN_KEYS)


def _backbone(p):
    from ctrlora.models.backbone import TinyBackboneConfig
    from ctrlora.training.pretrain import UNetPretrainConfig, VAEPretrainConfig
    from pipelines.foundation.pretrain_backbone import check_params

    b = check_params(p["backbone"])
    return (TinyBackboneConfig.from_params(b["tiny"]), VAEPretrainConfig.from_params(b["vae"]),
            UNetPretrainConfig.from_params(b["unet"]))


def _detectors(p):
    from ctrlora.evaluation.fidelity import default_detector_config
    from pipelines.foundation.detectors import KEYS

    d = checked_section("detectors", p["detectors"], KEYS)
    return [default_detector_config(c, **d["config"]) for c in d["conditions"]]


def _embed(p):
    from pipelines.stages.embed import KEYS

    return checked_section("embed", p["embed"], KEYS)


def _clinic(p):
    from ctrlora.data.clinic import ClinicConfig

    return ClinicConfig.from_params(p["clinic"], p["prepare"]["resolution"])


def _register(p):
    from pipelines.registry.gate import gate_config

    return gate_config(p["register"]["gate"])


def _flows(p, root):
    from pipelines.orchestration.flows import flows_params, schedule_params

    return flows_params(root), schedule_params(root)


def _study(module: str) -> Callable[[Any], Any]:
    def build(p):
        import importlib

        return importlib.import_module(module).params()

    return build


def _utility(p):
    from ctrlora.downstream.segmenter import segmenter_config

    u = _study("pipelines.utility.common")(p)
    return u, segmenter_config(u["segmenter"], augment=False, seed=0)


# section -> builder; each reads the params file given to it (the study commons and the flows
# read the file itself: $CTRLORA_PARAMS / the repo root)
BUILDERS: dict[str, Callable[[Any], Any]] = {
    "render": _render, "prepare": _prepare, "train_base": _train_base, "train_adapter": _train_adapter,
    "evaluate": _evaluate, "backbone": _backbone, "detectors": _detectors, "embed": _embed, "clinic": _clinic,
    "register": _register, "research": _study("pipelines.research.common"),
    "efficiency": _study("pipelines.efficiency.common"), "utility": _utility,
}
# sections whose readers are checked elsewhere: paths (every stage; the DVC graph tests), flows and
# schedule (checked below through the repo root), the condition and label tables (their modules'
# own tests), base_refresh (the base_pairs stage)
READ_ELSEWHERE = {"paths", "flows", "schedule", "conditions", "labels", "base_refresh"}


def _use(params: dict, tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("CTRLORA_PARAMS", str(path))
    return path


# ---------------------------------------------------------------------------- the repo's params build
def test_every_section_of_params_yaml_has_a_strict_builder():
    sections = set(load_params(PARAMS))
    assert sections - set(BUILDERS) - READ_ELSEWHERE == set(), "a params section no builder reads"


@pytest.mark.parametrize("section", sorted(BUILDERS))
def test_the_repo_params_build_every_config(section, monkeypatch):
    monkeypatch.setenv("CTRLORA_PARAMS", str(PARAMS))
    assert BUILDERS[section](load_params(PARAMS)) is not None


def test_the_repo_params_build_the_flow_settings():
    assert _flows(None, REPO)[0]["retries"] >= 0


def test_params_yaml_values_are_what_runs():
    """Where a library default differs from params, the config built holds the params value."""
    p = load_params(PARAMS)
    ev = _evaluate(p)
    assert ev.sampling.steps == p["evaluate"]["sampling"]["steps"]
    assert ev.sampling.scheduler == p["evaluate"]["sampling"]["scheduler"]
    assert ev.combined == {k: float(v) for k, v in p["evaluate"]["combined"].items()}
    assert ev.other_guidance_max_scans == p["evaluate"]["other_guidance_max_scans"]
    base = _train_base(p)
    assert base.train.learning_rate == p["train_base"]["train"]["learning_rate"]
    recipe = _train_adapter(p)
    assert (recipe.rank, recipe.max_pairs) == (p["train_adapter"]["rank"], p["train_adapter"]["max_pairs"])
    _, vae, unet = _backbone(p)
    assert unet.min_snr_gamma == p["backbone"]["unet"]["min_snr_gamma"]
    assert vae.train.mixed_precision == p["backbone"]["vae"]["train"]["mixed_precision"]


# ---------------------------------------------------------------------------- refusals
# (section, where in it a key is added / removed): one per builder family
CASES = [
    ("render", ("render",), "seed"),
    ("prepare", ("prepare",), "workers"),
    ("train_base", ("train_base",), "prompt_dropout"),
    ("train_base", ("train_base",), "imported_max_pairs"),
    ("train_adapter", ("train_adapter",), "max_pairs"),
    ("evaluate", ("evaluate",), "other_guidance_max_scans"),
    ("evaluate", ("evaluate",), "workers"),
    ("evaluate", ("evaluate", "sampling"), "seed"),
    ("evaluate", ("evaluate", "bootstrap"), "seed"),
    ("backbone", ("backbone",), "seed"),
    ("backbone", ("backbone", "quality"), "samples"),
    ("backbone", ("backbone", "tiny"), "norm_num_groups"),
    ("backbone", ("backbone", "vae"), "kl_weight"),
    ("backbone", ("backbone", "unet"), "min_snr_gamma"),
    ("detectors", ("detectors",), "threads"),
    ("embed", ("embed",), "batch_size"),
    ("research", ("research",), "bootstrap_seed"),
    ("efficiency", ("efficiency",), "bootstrap_seed"),
    ("utility", ("utility",), "bootstrap_seed"),
    ("utility", ("utility", "segmenter"), "weight_decay"),
    ("utility", ("utility", "audit"), "grid_pairs"),
]


def _node(params: dict, where: tuple[str, ...]) -> dict:
    node = params
    for key in where:
        node = node[key]
    return node


@pytest.mark.parametrize("section,where,key", CASES, ids=[".".join(w) + f"-{k}" for _, w, k in CASES])
def test_an_unknown_or_missing_key_is_refused_by_name(section, where, key, tmp_path, monkeypatch):
    shipped = load_params(PARAMS)
    errors = (ValueError, KeyError, SystemExit)

    extra = copy.deepcopy(shipped)
    _node(extra, where)["no_such_setting"] = 1
    _use(extra, tmp_path, monkeypatch)
    with pytest.raises(errors, match="no_such_setting"):
        BUILDERS[section](extra)

    lacking = copy.deepcopy(shipped)
    del _node(lacking, where)[key]
    _use(lacking, tmp_path, monkeypatch)
    with pytest.raises(errors, match=key):
        BUILDERS[section](lacking)


def test_the_flow_sections_refuse_unknown_keys(tmp_path):
    shipped = load_params(PARAMS)
    shipped["flows"]["no_such_setting"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shipped))
    with pytest.raises(KeyError, match="no_such_setting"):
        _flows(None, tmp_path)


def test_one_reader_a_missing_section_names_the_file_and_the_section(tmp_path, monkeypatch):
    from pipelines import settings

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"render": {"n": 1}}))
    with pytest.raises(KeyError, match=r"params\.yaml.*no_such_section"):
        read_sections("no_such_section", path=path)
    monkeypatch.setenv("CTRLORA_PARAMS", str(path))
    assert settings.params_path() == path
    assert settings.read_params("render") == {"n": 1}
    with pytest.raises(KeyError, match="no_such_section"):
        settings.read_params("render", "no_such_section")
    monkeypatch.delenv("CTRLORA_PARAMS")
    assert settings.params_path() == REPO / "params.yaml"
    assert settings.load_params(tmp_path) == {"render": {"n": 1}}
    assert settings.load_params(tmp_path / "nowhere") == {}


def test_checked_section_message_names_the_section_and_the_keys():
    with pytest.raises(ParamsKeyError) as e:
        checked_section("evaluate.sampling", {"steps": 1, "typo": 2}, ("steps", "seed"))
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert "evaluate.sampling" in str(e.value) and "'seed'" in str(e.value) and "'typo'" in str(e.value)
