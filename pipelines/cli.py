"""ctrlora-ops: the MLOps shell's command -- the MLflow registry, and generation from it.

    ctrlora-ops registry list [--json]                      every version, aliases, gate reasons; combinations
                                                            with their source versions and weights
    ctrlora-ops registry promote CONDITION VERSION          champion moves on the paired benchmark comparison
                             [--force --reason TEXT]         (or by hand, the reason recorded)
    ctrlora-ops registry rollback CONDITION                 champion back to the previous one
    ctrlora-ops registry rollback C1 C2 ...                 the same for the combination ctrlora+<c1>+<c2>...
    ctrlora-ops registry resolve models:/ctrlora-<c>@champion [--dst DIR]
    ctrlora-ops registry combine C1 C2 ... [--weight C=W]   the champions of C1, C2 ... as one
                                                            model ctrlora+<c1>+<c2>..., to serve
    ctrlora-ops generate ...                                ``ctrlora generate`` + models:/ adapters
                             [--combination models:/ctrlora+<c1>+<c2>@champion]
    ctrlora-ops studio [--port 7860]                        local web page: compose, compare, promote
    ctrlora-ops benchmark freeze | bump --reason R | show   the frozen benchmark the gate uses

The tracking store comes from ``MLFLOW_TRACKING_URI`` (default: ``sqlite:///mlflow.db`` in the
repo, see :mod:`pipelines.settings`). ``generate`` takes everything ``ctrlora generate`` takes;
an adapter may also be a registry URI (``models:/ctrlora-<c>@alias`` or
``models:/ctrlora-<c>/<version>``), which is downloaded and brings the backbone and base it was
registered with, so ``--backbone`` / ``--base`` may then be left out. ``--combination`` takes a
registered combination (:mod:`pipelines.registry.combination`): its adapters serve the
``--condition`` images that name them, with its recipe's weights and sampler.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from ctrlora import generate_cli
from pipelines.registry import frozen_benchmark as benchmark
from pipelines.settings import PARAMS_FILE, REPO_ROOT
from pipelines.studio import app as studio

URI_SCHEME = "models:/"


def _add_registry(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="every version of every ctrlora-* model, with aliases and tags, then every "
                                    "combination ctrlora+<c1>+<c2>... with its source versions and weights")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p = sub.add_parser("promote", help="move alias champion to VERSION if the paired comparison with the "
                                       "champion on the frozen benchmark says so")
    p.add_argument("condition")
    p.add_argument("version")
    p.add_argument("--force", action="store_true",
                   help="skip the comparison (needs --reason; recorded on the version)")
    p.add_argument("--reason", default="", help="why a forced promotion is made (required with --force)")
    p.add_argument("--repo", type=Path, default=REPO_ROOT,
                   help=f"project whose {PARAMS_FILE} 'register.gate' is applied (default: {REPO_ROOT})")
    p = sub.add_parser("rollback", help="move alias champion back to the previous champion, of a condition's "
                                        "model or of a combination")
    p.add_argument("condition", nargs="+", metavar="CONDITION",
                   help="one condition (model ctrlora-<c>), or the conditions of a combination: C1 C2 ..., "
                        "C1+C2 or ctrlora+<c1>+<c2>")
    p = sub.add_parser("resolve", help="download a models:/ URI and print its local directories")
    p.add_argument("uri", help="models:/ctrlora-<condition>@<alias> or models:/ctrlora-<c>/<version> "
                               "(or a combination, models:/ctrlora+<c1>+<c2>@<alias>)")
    p.add_argument("--dst", type=Path, default=None, help="download into this folder")
    p = sub.add_parser("combine", help="register the champions of several conditions as one model "
                                       "ctrlora+<c1>+<c2>... (its champion), to serve and generate with")
    p.add_argument("conditions", nargs="+", metavar="CONDITION")
    p.add_argument("--weight", action="append", default=[], metavar="CONDITION=WEIGHT",
                   help="residual weight of a condition (default: params evaluate.combined when it names "
                        "exactly these conditions, else each version's recipe); repeatable")
    p.add_argument("--repo", type=Path, default=REPO_ROOT,
                   help=f"project whose {PARAMS_FILE} 'evaluate' is read (default: {REPO_ROOT})")


def _print_rows(rows: list[dict], combinations: list[dict]) -> None:
    if not rows and not combinations:
        print("no ctrlora-* models registered")
        return
    if rows:
        print(f"{'kind':<12} {'model':<24} {'ver':>4} {'aliases':<20} {'dataset_hash':<14} {'metrics':<28} gate")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items())[:3])
        print(f"{'adapter':<12} {r['model']:<24} {r['version']:>4} {','.join(r['aliases']) or '-':<20} "
              f"{(r['dataset_hash'] or '-')[:12]:<14} {metrics:<28} "
              f"{r['gate'] or '-'}: {r['gate_reason'] or ''}")
    if combinations:
        print(f"\n{'kind':<12} {'model':<36} {'ver':>4} {'aliases':<20} sources (weight); sampler")
    for r in combinations:
        recipe = r.get("recipe") or {}
        weights = r.get("weights") or recipe.get("weights") or {}
        built = ", ".join(f"{u[len(URI_SCHEME):] if u.startswith(URI_SCHEME) else u} ({weights.get(c, '?')})"
                          for c, u in sorted(r["sources"].items()))
        sampler = (f"{recipe['scheduler']}, {recipe['steps']} steps, guidance {recipe['guidance_scale']}"
                   if all(k in recipe for k in ("scheduler", "steps", "guidance_scale")) else "-")
        print(f"{'combination':<12} {r['model']:<36} {r['version']:>4} {','.join(r['aliases']) or '-':<20} "
              f"{built}; {sampler}")


def _run_registry(args) -> int:
    from pipelines.registry import combination
    from pipelines.registry import models as registry
    from pipelines.registry.register import register_params

    action = args.registry_command
    try:
        if action == "list":
            rows, combos = registry.list_models(), combination.list_combinations()
            if args.json:  # one list: adapter versions, then combination versions (each row has its "kind")
                print(json.dumps(rows + combos, indent=1))
            else:
                _print_rows(rows, combos)
            return 0
        if action == "combine":
            weights = {}
            for item in args.weight:
                cond, sep, value = item.partition("=")
                if not sep or not cond.strip():
                    raise registry.RegistryError(f"--weight {item!r}: expected CONDITION=WEIGHT")
                weights[cond.strip()] = value
            built = combination.combine(args.conditions, root=args.repo, weights=weights)
            verb = "registered" if built.created else "already registered (same adapters and recipe)"
            print(f"{built.model_name} v{built.version} {verb}; champion (was "
                  f"{'v' + built.previous_champion if built.previous_champion else 'none'})")
            for c, uri in sorted(built.sources.items()):
                print(f"  {c}: {uri}, weight {built.recipe['weights'][c]:g}")
            print(f"  sampler: {built.recipe['scheduler']}, {built.recipe['steps']} steps, guidance "
                  f"{built.recipe['guidance_scale']:g}; weights from {built.weights_source}")
            print(f"  serve: mlflow models serve -m models:/{built.model_name}@champion --env-manager local")
            return 0
        if action == "promote":
            from pipelines.registry.frozen_benchmark import gate_for
            from pipelines.registry.registration import promote

            if args.force and not args.reason.strip():
                raise registry.RegistryError("--force needs --reason TEXT (it is recorded on the version)")
            gate = register_params(args.repo)["gate"]
            if args.force:
                res = promote(args.condition, args.version, gate=gate, force=True, reason=args.reason)
            else:
                with contextlib.ExitStack() as stack:
                    judge = gate_for(args.repo, gate, log=lambda m: print(m, file=sys.stderr),
                                     freeze_missing=False)
                    if judge is not None:
                        stack.enter_context(judge)
                    res = promote(args.condition, args.version, gate=gate, judge=judge)
            verb = "promoted to champion" if res.promoted else "NOT promoted (now challenger)"
            print(f"{registry.model_name(args.condition)} v{res.version} {verb}: {res.reason}")
            return 0 if res.promoted else 1
        if action == "rollback":
            words = args.condition
            if len(words) == 1 and "+" not in words[0]:
                res = registry.rollback(words[0])
                name = registry.model_name(words[0])
            else:
                res = combination.rollback_combination(words)
                name = res.condition
            print(f"{name}: champion v{res.previous} -> v{res.version}")
            return 0
        if combination.is_combination(args.uri[len(URI_SCHEME):]):
            combo = combination.resolve_combination_uri(args.uri, args.dst)
            print(json.dumps({"model": combo.model_name, "version": combo.version, "backbone": str(combo.backbone),
                              "base": str(combo.base), "adapters": {k: str(v) for k, v in combo.adapters.items()},
                              "recipe": combo.recipe}, indent=1))
            return 0
        r = registry.resolve_adapter_uri(args.uri, args.dst)
        print(json.dumps({"model": r.model_name, "version": r.version, "condition": r.condition,
                          "backbone": str(r.backbone), "base": str(r.base),
                          "adapter": str(r.adapter)}, indent=1))
        return 0
    except registry.RegistryError as exc:
        print(f"ctrlora-ops registry {action}: {exc}", file=sys.stderr)
        return 1


def _same_part(resolved: list, attr: str, flag: str) -> Path:
    """The backbone or base that every resolved URI was registered with (they must agree)."""
    from ctrlora.data.hashing import dvc_dir_md5
    from ctrlora.models.backbone import backbone_hash

    digest = backbone_hash if attr == "backbone" else dvc_dir_md5
    (first_uri, first), *rest = resolved
    ref = digest(getattr(first, attr))
    for uri, r in rest:
        if digest(getattr(r, attr)) != ref:
            raise generate_cli.GenerateError(f"{uri} was registered with another {attr} than "
                                             f"{first_uri}; pass {flag} explicitly")
    return getattr(first, attr)


def _use_combination(args, adapters: dict, downloads: list, resolved: list, sources: dict,
                     items: list, recipes: list) -> None:
    """``--combination URI``: its adapters serve the ``--condition`` images that name them (an
    ``--adapter`` of the same name wins), at its recipe's weights; its recipe decides the sampler;
    the conditions are put in its order (the order the pipeline draws their noise in, as the
    served model does)."""
    from ctrlora.models.adapters import BASE_NAME
    from pipelines.registry.combination import resolve_combination_uri

    uri = args.combination
    try:
        combo = resolve_combination_uri(uri)
    except Exception as exc:  # MLflow / registry errors: report them plainly
        raise generate_cli.GenerateError(f"--combination {uri}: {exc}") from exc
    downloads.append(combo.local_dir)
    resolved.append((uri, combo))
    recipes.append(combo.recipe)
    conditions = generate_cli.parse_pairs(args.condition, "condition")
    unknown = sorted(set(conditions) - set(combo.adapters) - set(adapters) - {BASE_NAME})
    if unknown:
        raise generate_cli.GenerateError(f"condition(s) {unknown}: not in {combo.model_name} v{combo.version} "
                                         f"(it has {list(combo.adapters)}) and no --adapter names them")
    for name in conditions:
        if name in combo.adapters and name not in adapters:
            items.append(f"{name}={combo.adapters[name]}:{combo.recipe['weights'][name]}")
            sources[name] = f"{uri} ({name})"
    rank = {c: i for i, c in enumerate(combo.adapters)}
    args.condition = sorted(args.condition, key=lambda item: rank.get(item.partition("=")[0].strip(), len(rank)))


def _resolve_uris(args, downloads: list) -> dict[str, str]:
    """Replace ``models:/`` adapters in ``args`` by downloaded folders (appended to
    ``downloads``), fill in ``--backbone`` / ``--base`` from them; returns how ``generate.json``
    names each part that came from the registry."""
    from pipelines.registry.models import resolve_adapter_uri

    generate_cli.check_images(generate_cli.parse_pairs(args.condition, "condition"))
    adapters = generate_cli.parse_pairs(args.adapter, "adapter")
    resolved: list = []
    sources: dict[str, str] = {}
    items: list[str] = []
    recipes: list[dict] = []
    if getattr(args, "combination", None):
        _use_combination(args, adapters, downloads, resolved, sources, items, recipes)
    for name, (where, weight) in adapters.items():
        if where.startswith(URI_SCHEME):
            try:
                r = resolve_adapter_uri(where)
                recipe = _recipe_of(r)
            except Exception as exc:  # MLflow / registry errors: report them plainly
                raise generate_cli.GenerateError(f"adapter {name!r}: {exc}") from exc
            downloads.append(r.local_dir)
            resolved.append((where, r))
            sources[name], where = where, str(r.adapter)
            if recipe:
                recipes.append(recipe)
                if weight is None:  # the residual weight the version was evaluated at
                    weight = float(recipe["weight"])
        items.append(f"{name}={where}" + ("" if weight is None else f":{weight}"))
    args.adapter = items
    # steps, guidance and sampler the user left unset: the combination's recipe, else the first
    # registry version's (how it was evaluated), else the library command's defaults
    first = recipes[0] if recipes else {}
    for attr, key in (("steps", "steps"), ("guidance", "guidance_scale"), ("scheduler", "scheduler")):
        if getattr(args, attr, None) is None:
            setattr(args, attr, first.get(key, _library_default(attr)))
    for attr, flag in (("backbone", "--backbone"), ("base", "--base")):
        if getattr(args, attr) is None and resolved:
            setattr(args, attr, str(_same_part(resolved, attr, flag)))
            sources[attr] = f"from {resolved[0][0]}"
    return sources


def _library_default(attr: str):
    """``ctrlora generate``'s own default for ``attr`` (stated once, in its parser)."""
    parser = argparse.ArgumentParser(add_help=False)
    generate_cli.add_arguments(parser, parts_required=False)
    return parser.get_default(attr)


def _recipe_of(resolved) -> dict | None:
    """The sampling recipe a registered version carries (its ``recipe`` tag), or None."""
    from mlflow import MlflowClient

    raw = MlflowClient().get_model_version(resolved.model_name, resolved.version).tags.get("recipe")
    return json.loads(raw) if raw else None


def _run_generate(args) -> int:
    prog = "ctrlora-ops generate"
    downloads: list[Path] = []
    try:
        try:
            sources = _resolve_uris(args, downloads)
        except generate_cli.GenerateError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        return generate_cli.run(args, sources=sources, prog=prog)
    finally:
        for d in downloads:
            shutil.rmtree(d, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrlora-ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("registry", help="list / promote / roll back / resolve registered adapters")
    _add_registry(p)
    p.set_defaults(_run=_run_registry)
    p = sub.add_parser("benchmark", help="freeze / bump / show the benchmark promotions are decided on")
    benchmark.add_arguments(p)
    p.set_defaults(_run=benchmark.run)
    p = sub.add_parser("generate", help="ctrlora generate, with models:/ registry URIs as adapters")
    generate_cli.add_arguments(p, parts_required=False)
    p.add_argument("--combination", default=None, metavar="URI",
                   help="a registered combination, models:/ctrlora+<c1>+<c2>@champion: its adapters serve the "
                        "--condition images that name them, with its recipe's weights and sampler")
    # unset unless given: a registered version's recipe fills them (see _resolve_uris)
    p.set_defaults(_run=_run_generate, steps=None, guidance=None, scheduler=None)
    p = sub.add_parser("studio", help="local web page: compose conditions, compare versions, promote")
    studio.add_arguments(p)
    p.set_defaults(_run=studio.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
