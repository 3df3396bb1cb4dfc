"""Combinations of conditions in the registry: ``ctrlora+<c1>+<c2>...`` built from champions.

CtrLoRA combines conditions at inference as the weighted sum of their ControlNet residuals, one
adapter per condition on one base. A combination version pins exactly which adapters take part
and how they are weighted:

    ctrlora-ops registry combine segmentation lighting [--weight lighting=1.5] [--repo DIR]

takes the ``champion`` of ``ctrlora-segmentation`` and of ``ctrlora-lighting`` and registers a
version of ``ctrlora+lighting+segmentation`` (names sorted, so one set of conditions is one
model). The version stores no weights of its own: its ``parts.json`` references the backbone,
the base ControlNet and every adapter by content hash, each logged once as a part run
(:func:`pipelines.registry.registration.log_part`) and checked against that hash when fetched,
like a one-condition version's backbone and base. Its tags and model card name each condition's
source version, adapter, dataset and base hashes; its ``recipe.json`` holds the sampler and the
per-condition residual weights. It serves with the same pyfunc
(:class:`pipelines.registry.pyfunc.CtrLoRAPyfunc`): a request names any subset of its conditions.

The recipe: the sampler (scheduler, steps, guidance) every source version was evaluated with
(their ``recipe`` tags must agree); the weights, where ``--weight`` does not set them, from
params ``evaluate.combined`` when it names exactly these conditions (the combination as the
evaluation measured it), else each source version's own evaluated weight.

A new combination version takes the ``champion`` alias of its model at once: the combination is
not gated on the frozen benchmark (each source version was, on its own condition), and its
``reason`` tag says so. Building it again from the same adapters and recipe finds the existing version
(idempotent: same adapter bytes, same training data, same recipe) and only moves the alias back
to it if needed. Rebuild after a source champion
moves; the model's previous champions stay in its ``champion_history``, which
:func:`rollback_combination` (``ctrlora-ops registry rollback C1 C2``) walks back.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.registry.lock import model_lock
from pipelines.registry.models import (ADAPTERS_KEY, CHAMPION, PARTS_FILE, RegistryError, _now,
                                       _set_champion, alias_version, download_version, fetch_adapters,
                                       fetch_parts, model_name, resolve_adapter_uri, versions)

COMBINATION_PREFIX = "ctrlora+"   # outside "ctrlora-": listed apart from the adapters (list_combinations)
KEY_TAG = "combination_key"       # sha256 of the parts' hashes and the recipe: the idempotency key
SAMPLER_KEYS = ("scheduler", "steps", "guidance_scale")


def combination_name(conditions: Sequence[str]) -> str:
    """``ctrlora+<c1>+<c2>...``, the conditions sorted."""
    return COMBINATION_PREFIX + "+".join(sorted(conditions))


def is_combination(name: str) -> bool:
    return name.startswith(COMBINATION_PREFIX)


def combination_of(spec: Sequence[str]) -> str:
    """The combination model a user names: its conditions (``lighting segmentation``, in any
    order), one ``c1+c2`` word, or the model name ``ctrlora+c1+c2``; at least two conditions."""
    conds: list[str] = []
    for word in spec:
        word = str(word)
        if word.startswith("models:/"):
            raise RegistryError(f"{word!r}: name the combination, not a URI (e.g. ctrlora+lighting+segmentation)")
        word = word[len(COMBINATION_PREFIX):] if is_combination(word) else word
        conds += [c.strip() for c in word.split("+")]
    if any(not c for c in conds):
        raise RegistryError(f"{' '.join(map(str, spec))!r}: an empty condition name")
    if len(set(conds)) != len(conds):
        raise RegistryError(f"conditions given twice: {conds}")
    if len(conds) < 2:
        raise RegistryError(f"a combination has two or more conditions, got {conds}")
    return combination_name(conds)


def rollback_combination(spec: Sequence[str]):
    """``champion`` of the combination :func:`combination_of` names → its previous champion
    (the same ``champion_history`` walk as a condition's rollback). A later ``combine`` of the
    same source versions and recipe moves the alias back to the version it finds."""
    from pipelines.registry.models import rollback_model

    name = combination_of(spec)
    return rollback_model(name, name)


@dataclass
class CombinationResult:
    model_name: str
    version: str
    created: bool                 # False: the same adapters and recipe were already registered
    sources: dict[str, str]       # condition -> models:/ctrlora-<c>/<version>
    recipe: dict[str, Any]
    weights_source: str
    previous_champion: str | None
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResolvedCombination:
    model_name: str
    version: str
    backbone: Path
    base: Path
    adapters: dict[str, Path]     # condition -> local adapter directory, sorted by condition
    recipe: dict[str, Any]        # scheduler, steps, guidance_scale, weights {condition: w}
    local_dir: Path


def check_weights(weights: Mapping[str, Any], conditions: Sequence[str], what: str) -> dict[str, float]:
    """``{condition: weight}`` with every name among ``conditions`` and every weight finite and >= 0."""
    out = {}
    for c, w in weights.items():
        if c not in conditions:
            raise RegistryError(f"{what}: {c!r} is not one of the conditions {sorted(conditions)}")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise RegistryError(f"{what}: weight of {c!r} is not a number: {w!r}") from None
        if not math.isfinite(value) or value < 0:
            raise RegistryError(f"{what}: weight of {c!r} must be finite and >= 0, got {w!r}")
        out[str(c)] = value
    return out


def combination_recipe(conditions: Sequence[str], source_recipes: Mapping[str, Mapping[str, Any] | None],
                       evaluate: Mapping[str, Any], weights: Mapping[str, Any] | None = None,
                       where: str = "params.yaml evaluate") -> tuple[dict[str, Any], str]:
    """(recipe, where its weights come from) of a combination of ``conditions``, whose source
    versions carry ``source_recipes`` (None: a version registered without one, whose sampling is
    then params ``evaluate``'s, :func:`pipelines.registry.register.sampling_recipe`)."""
    from pipelines.registry.register import sampling_recipe

    recipes: dict[str, Mapping[str, Any]] = {}
    for c in conditions:
        r = source_recipes.get(c) or sampling_recipe(evaluate, c, where)
        if r is None:
            raise RegistryError(f"{model_name(c)}: its version records no recipe and {where} has no "
                                "sampling to take it from")
        recipes[c] = r
    samplers = {c: tuple(r[k] for k in SAMPLER_KEYS) for c, r in recipes.items()}
    if len(set(samplers.values())) > 1:
        said = "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in zip(SAMPLER_KEYS, s))
                         for c, s in sorted(samplers.items()))
        raise RegistryError(f"the source versions were evaluated with different samplers ({said}); "
                            "a combination samples with one")
    combined = evaluate.get("combined") or {}
    if set(combined) == set(conditions):
        base = check_weights(combined, conditions, f"{where}.combined")
        source = f"{where}.combined (this combination as the evaluation measured it)"
    else:
        base = {c: float(recipes[c]["weight"]) for c in conditions}
        source = ("each source version's own evaluated weight (this combination was not evaluated "
                  f"together; {where}.combined names {sorted(combined) or 'none'})")
    given = check_weights(weights or {}, conditions, "--weight")
    if given:
        source = f"given at build time for {sorted(given)}; the others: {source}"
    first = recipes[sorted(conditions)[0]]
    recipe = {k: first[k] for k in SAMPLER_KEYS}
    recipe["weights"] = {c: given.get(c, base[c]) for c in sorted(conditions)}
    return recipe, source


def combination_key(backbone_hash: str, base_hash: str, adapters: Mapping[str, str],
                    datasets: Mapping[str, str], recipe: Mapping[str, Any]) -> str:
    """What makes two combination versions the same: the parts' content hashes, the data each
    adapter was trained on (as a one-condition version is keyed) and the recipe."""
    record = {"backbone": backbone_hash, "base": base_hash, "adapters": dict(sorted(adapters.items())),
              "datasets": dict(sorted(datasets.items())), "recipe": recipe}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def combine(conditions: Sequence[str], *, root: Path, weights: Mapping[str, Any] | None = None,
            source_alias: str = CHAMPION) -> CombinationResult:
    """Register the combination of ``conditions``' ``source_alias`` versions as a version of
    :func:`combination_name` and make it that model's champion (see the module docstring)."""
    from pipelines.registry.register import evaluate_params, git_commit
    from pipelines.registry.registration import (CARD_FILE, PYFUNC_CODE, RECIPE_FILE, experiment_id,
                                                 log_part, pip_requirements)
    from pipelines.registry.pyfunc import SIGNATURE

    conds = sorted({str(c) for c in conditions})
    if len(conds) != len(list(conditions)):
        raise RegistryError(f"conditions given twice: {list(conditions)}")
    if len(conds) < 2:
        raise RegistryError(f"a combination needs two or more conditions, got {conds}; one condition "
                            f"serves as models:/{model_name(conds[0]) if conds else 'ctrlora-<c>'}@champion")
    root = Path(root)
    evaluate = evaluate_params(root)
    where = f"{root / 'params.yaml'}: evaluate"
    client = MlflowClient()
    sources = {}
    for c in conds:
        v = alias_version(client, model_name(c), source_alias)
        if v is None:
            raise RegistryError(f"{model_name(c)} has no {source_alias!r} version to combine")
        sources[c] = client.get_model_version(model_name(c), v)
    bases = {str(mv.tags.get("base_hash")) for mv in sources.values()}
    if len(bases) > 1:
        raise RegistryError("the versions were trained on different base ControlNets: " + ", ".join(
            f"{model_name(c)} v{mv.version} base_hash {str(mv.tags.get('base_hash'))[:12]}"
            for c, mv in sources.items()) + "; a combination needs one base")
    recipe, weights_source = combination_recipe(
        conds, {c: json.loads(mv.tags["recipe"]) if mv.tags.get("recipe") else None for c, mv in sources.items()},
        evaluate, weights, where)
    name = combination_name(conds)
    with model_lock(name, client), tempfile.TemporaryDirectory(prefix="ctrlora-combine-") as tmp:
        exp = experiment_id(client)
        refs: dict[str, dict[str, dict[str, str]]] = {"backbone": {}, "base": {}, "adapter": {}}
        for c, mv in sources.items():
            r = resolve_adapter_uri(f"models:/{model_name(c)}/{mv.version}", Path(tmp) / "versions" / c)
            stage = Path(tmp) / "parts" / c
            stage.mkdir(parents=True)
            refs["backbone"][c] = log_part(client, exp, "backbone", r.backbone, stage)
            refs["base"][c] = log_part(client, exp, "base", r.base, stage, skip_top=("adapters",))
            refs["adapter"][c] = log_part(client, exp, "adapter", r.adapter, stage)
        for kind in ("backbone", "base"):
            found = {ref["content_hash"] for ref in refs[kind].values()}
            if len(found) > 1:
                raise RegistryError(f"the versions were registered with different {kind}s: " + ", ".join(
                    f"{model_name(c)} v{sources[c].version} {ref['content_hash'][:12]}"
                    for c, ref in refs[kind].items()) + f"; a combination needs one {kind}")
        backbone_ref, base_ref = refs["backbone"][conds[0]], refs["base"][conds[0]]
        adapter_hashes = {c: ref["content_hash"] for c, ref in refs["adapter"].items()}
        datasets = {c: str(mv.tags.get("dataset_hash", "")) for c, mv in sources.items()}
        key = combination_key(backbone_ref["content_hash"], base_ref["content_hash"], adapter_hashes, datasets,
                              recipe)
        source_uris = {c: f"models:/{model_name(c)}/{mv.version}" for c, mv in sources.items()}
        for mv in versions(client, name):
            if mv.tags.get(KEY_TAG) == key:
                previous = alias_version(client, name, CHAMPION)
                if previous != str(mv.version):
                    _set_champion(client, name, str(mv.version))
                    client.set_model_version_tag(name, str(mv.version), "promoted_at", _now())
                return CombinationResult(name, str(mv.version), False, source_uris, recipe, weights_source,
                                         previous, mv.run_id, dict(mv.tags))

        tags = {"conditions": ",".join(conds), KEY_TAG: key, "recipe": json.dumps(recipe, sort_keys=True),
                "weights_source": weights_source, "base_hash": next(iter(bases)), "git_commit": git_commit(root),
                "backbone_content_hash": backbone_ref["content_hash"],
                "base_content_hash": base_ref["content_hash"],
                "reason": "built from " + ", ".join(f"{u} ({source_alias})" for u in source_uris.values())
                          + "; each gated on the frozen benchmark on its own condition, the combination "
                            "itself is not gated"}
        for c, mv in sources.items():
            tags[f"source.{c}"] = source_uris[c]
            tags[f"adapter_hash.{c}"] = str(mv.tags.get("adapter_hash", ""))
            tags[f"dataset_hash.{c}"] = datasets[c]
        parts_file = Path(tmp) / PARTS_FILE
        parts_file.write_text(json.dumps({"backbone": backbone_ref, "base": base_ref,
                                          ADAPTERS_KEY: refs["adapter"]}, indent=1, sort_keys=True) + "\n")
        recipe_file = Path(tmp) / RECIPE_FILE
        recipe_file.write_text(json.dumps(recipe, indent=1, sort_keys=True) + "\n")
        card = Path(tmp) / CARD_FILE
        card.write_text(combination_card(name, sources, recipe, weights_source, tags))
        with mlflow.start_run(experiment_id=exp, run_name=f"combine-{'+'.join(conds)}") as run:
            mlflow.log_params({"conditions": ",".join(conds), "source_alias": source_alias,
                               **{f"source.{c}": u for c, u in source_uris.items()},
                               **{f"weight.{c}": w for c, w in recipe["weights"].items()},
                               **{k: recipe[k] for k in SAMPLER_KEYS}})
            mlflow.set_tags(tags)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE),
                artifacts={"parts": str(parts_file), "recipe": str(recipe_file), "card": str(card)},
                signature=SIGNATURE, pip_requirements=pip_requirements(),
                metadata={"conditions": conds, "sources": source_uris, KEY_TAG: key})
            mv = mlflow.register_model(info.model_uri, name, tags=tags)
        client.update_registered_model(name, description=(
            "CtrLoRA combination of " + " + ".join(conds) + ": the weighted sum of their adapters' "
            "ControlNet residuals, built from each condition's registered version"))
        version = str(mv.version)
        previous = _set_champion(client, name, version)
        client.set_model_version_tag(name, version, "promoted_at", _now())
        mv = client.get_model_version(name, version)
    return CombinationResult(name, version, True, source_uris, recipe, weights_source, previous,
                             run.info.run_id, dict(mv.tags))


def combination_card(name: str, sources: Mapping[str, Any], recipe: Mapping[str, Any],
                     weights_source: str, tags: Mapping[str, str]) -> str:
    """The model card of a combination version: which version of each condition, their hashes,
    the recipe and where its weights come from, intended use and limits."""
    lines = [f"# {name}", "",
             "A CtrLoRA combination: one ControlNet pass per condition with that condition's adapter, "
             "their residuals summed with the weights below, on the backbone and base ControlNet its "
             "`parts.json` names (every part referenced by content hash).", "",
             "| condition | version | adapter hash (sha256) | dataset hash (DVC) | weight |", "|---|---|---|---|---|"]
    for c, mv in sorted(sources.items()):
        lines.append(f"| {c} | `{model_name(c)}` v{mv.version} | `{mv.tags.get('adapter_hash', '?')}` | "
                     f"`{mv.tags.get('dataset_hash', '?')}` | {recipe['weights'][c]:g} |")
    lines += ["", "| what | value |", "|---|---|",
              f"| base ControlNet hash | `{tags.get('base_hash')}` |",
              f"| code (git commit) | `{tags.get('git_commit')}` |",
              "| sampling recipe (serving's default) | " + ", ".join(
                  f"{k} {recipe[k]}" for k in SAMPLER_KEYS) + " |",
              f"| weights from | {weights_source} |",
              "", "## Intended use and limits", "",
              "* Generating intraoral images whose structure follows several condition maps at once, to "
              "review or to grow an annotated set; generated images are not clinical evidence.",
              "* Each source version passed the promotion gate on its own condition; the combination of "
              "these versions is not gated. The evaluation measures the combination named in params "
              "`evaluate.combined` against each single condition (docs/evaluation.md).",
              "* A request may name any subset of the conditions; a subset samples with the weights above.",
              "* Before sharing generated images outside the clinic, check they are not copies of "
              "training photographs.", ""]
    return "\n".join(lines)


def resolve_combination_uri(uri: str, dst_path: str | Path | None = None) -> ResolvedCombination:
    """``models:/ctrlora+<c1>+...@alias`` (or ``/<version>``) → local backbone, base and adapter
    directories (fetched by content hash) and the recipe; the model's own files go to
    ``dst_path`` or a new temporary directory, which the caller removes."""
    from pipelines.registry.pyfunc import recipe_of

    name, mv, local, paths = download_version(uri, dst_path)
    adapters = fetch_adapters(paths["parts"]) if "parts" in paths else {}
    if not adapters:
        if dst_path is None:
            shutil.rmtree(local, ignore_errors=True)
        raise RegistryError(f"{uri}: not a combination of conditions (no adapters in its parts)")
    parts = fetch_parts(paths["parts"])
    raw = json.loads(paths["recipe"].read_text()) if "recipe" in paths else None
    return ResolvedCombination(name, str(mv.version), parts["backbone"], parts["base"], adapters,
                               recipe_of(raw, list(adapters)), local)


def list_combinations() -> list[dict[str, Any]]:
    """One row per version of every ``ctrlora+...`` model (``kind`` ``combination``): version,
    aliases, conditions, source versions, recipe and its per-condition weights."""
    client = MlflowClient()
    rows = []
    try:
        found = client.search_registered_models(f"name LIKE '{COMBINATION_PREFIX}%'")
    except MlflowException:
        return []
    for rm in found:
        aliases: dict[str, list[str]] = {}
        for alias, v in (getattr(rm, "aliases", None) or {}).items():
            aliases.setdefault(str(v), []).append(alias)
        for mv in sorted(versions(client, rm.name), key=lambda v: int(v.version)):
            t = dict(mv.tags)
            recipe = json.loads(t["recipe"]) if t.get("recipe") else None
            rows.append({"kind": "combination", "model": rm.name, "version": str(mv.version),
                         "aliases": sorted(aliases.get(str(mv.version), [])),
                         "conditions": (t.get("conditions") or "").split(","),
                         "sources": {k[len("source."):]: v for k, v in t.items() if k.startswith("source.")},
                         "recipe": recipe, "weights": (recipe or {}).get("weights") or {},
                         "weights_source": t.get("weights_source"), "git_commit": t.get("git_commit"),
                         "reason": t.get("reason")})
    return rows
