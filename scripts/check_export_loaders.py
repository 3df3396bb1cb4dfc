"""Load a ``ctrlora export`` folder with two third-party CtrLoRA loaders and write their residuals.

Runs in a separate virtual environment that holds the loaders' own dependencies (not this
project's): ``scripts/check_export_loaders.sh`` builds it and fetches the sources;
``tests/models/test_export_loaders.py`` drives this script and compares the residuals with
this project's model.

Loaders:

* ``reference``: the CtrLoRA reference code (ldm-based). The model is its
  ``cldm.cldm_ctrlora_inference.ControlNetInference`` built from the export's
  ``ldm_config.json`` kwargs; files are read with its ``cldm.model.load_state_dict``; keys are
  routed with its ``CtrLoRA.check_key`` exactly as ``CtrLoRA.create_model`` does (base file:
  ``control_model.*`` keys that fail the test; adapter files: keys that pass; ``switch_lora`` /
  ``copy_weights_to_switchable`` per adapter); each adapter's residuals come from a forward
  after ``switch_lora(i)``.
* ``comfyui``: ComfyUI-Advanced-ControlNet's CtrLoRA loader on ComfyUI (run with ``--cpu``).
  Its entry point ``load_ctrlora`` cannot be imported without torchvision (``comfy.model_detection``
  -> ``comfy.supported_models`` -> ``comfy.model_base`` -> ``comfy.ldm.cosmos`` imports it at
  module level, and so do ``comfy.controlnet`` and ``comfy.lora``), so what runs is the part of
  its path that imports without it: ``comfy.utils.load_torch_file``, the base-file checks of
  ``load_ctrlora``, ``comfy.model_detection.detect_unet_config`` with the head settings of
  ComfyUI's model table (SD15's when its ``unet_config`` matches, else ``BASE``'s), the control
  model class ``ControlNetCtrLoRA`` on ``comfy.cldm.cldm.ControlNet`` with
  ``comfy.ops.pick_operations``, the ``strict=False`` load under ``control_model.``, the adapter
  key split of ``load_lora_data`` (``set`` patches for zero convs and norms, LoRA up/down on
  ``<linear>.weight``), patches applied as ComfyUI applies them (``set`` copies; LoRA through
  ``comfy.weight_adapter.LoRAAdapter.calculate_weight``), and the class's own ``forward``.

Definitions that live in modules which cannot be imported (a module-level import of an
unavailable package) are taken from the source file by name and executed unchanged; the
module's import statements run one by one and those that fail are listed in the report. Nothing
is replaced by a stand-in.

Output: ``--out`` (safetensors) holds ``<loader>/<adapter>/<i>`` for the 13 residuals (12 input
blocks, then the middle block), ``--report`` (JSON) what each loader read, matched and skipped.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

N_RESIDUALS = 13


# ---------------------------------------------------------------------- helpers
def definitions_from_source(path: Path, names: list[str], provided: dict | None = None) -> tuple[dict, list[str]]:
    """Execute the module-level imports of ``path`` one by one (skipping, and listing, those that
    fail) and then the top-level classes/functions called ``names``, unchanged, in one namespace
    (``provided`` pre-binds names whose own modules cannot be imported). Returns the namespace
    and the skipped import statements."""
    tree = ast.parse(path.read_text(), filename=str(path))
    ns: dict = {"__name__": f"_from_source_{path.stem}", "__file__": str(path), **(provided or {})}
    skipped: list[str] = []
    wanted = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), ns)
            except ImportError as exc:
                skipped.append(f"{ast.unparse(node)}  ({type(exc).__name__}: {exc})")
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names:
            wanted.append(node)
    found = {n.name for n in wanted}
    if found != set(names):
        raise SystemExit(f"{path}: definitions not found: {sorted(set(names) - found)}")
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), ns)
    return ns, skipped


def class_constant(path: Path, cls: str, attr: str):
    """A literal class attribute (``cls.attr = {...}``) read from source without importing it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.Assign) and any(getattr(t, "id", None) == attr for t in item.targets):
                    return ast.literal_eval(item.value)
    raise SystemExit(f"{path}: no literal {cls}.{attr}")


def adapter_files(export: Path, names: list[str], fmt: str) -> list[Path]:
    files = [export / f"{n}.{fmt}" for n in names]
    for f in [export / f"base.{fmt}", *files]:
        if not f.is_file():
            raise SystemExit(f"{f}: not found (run `ctrlora export` first)")
    return files


def lora_rank(sd: dict) -> int:
    ranks = {tuple(v.shape)[0] for k, v in sd.items() if k.endswith(".lora_layer.down.weight")}
    if len(ranks) != 1:
        raise SystemExit(f"adapter file has LoRA ranks {sorted(ranks)} (need exactly one)")
    return ranks.pop()


# ---------------------------------------------------------------------- reference
def run_reference(src: Path, export: Path, names: list[str], fmt: str, inputs: dict) -> tuple[dict, dict]:
    import torch

    sys.path.insert(0, str(src))
    from cldm.model import load_state_dict  # the reference's own file reader

    skipped: list[str] = []
    # cldm.cldm imports torchvision and the training classes at module level; only ControlNet is needed
    ns, s = definitions_from_source(src / "cldm" / "cldm.py", ["ControlNet"])
    skipped += s
    ns2, s = definitions_from_source(src / "cldm" / "cldm_ctrlora_inference.py", ["ControlNetInference"],
                                     provided={"ControlNet": ns["ControlNet"]})
    skipped += s
    api, s = definitions_from_source(src / "api.py", ["CtrLoRA"])  # for its check_key, as create_model uses it
    skipped += s
    check_key = api["CtrLoRA"].check_key

    kwargs = json.loads((export / "ldm_config.json").read_text())["controlnet_kwargs"]
    files = adapter_files(export, names, fmt)
    adapter_sds = [load_state_dict(str(f), location="cpu") for f in files]
    rank = lora_rank(adapter_sds[0])

    class Holder(torch.nn.Module):  # the ControlLDM's attribute name, so keys keep `control_model.`
        pass

    holder = Holder()
    holder.control_model = ns2["ControlNetInference"](lora_rank=rank, lora_num=len(names), **kwargs)
    cn = holder.control_model

    # the steps of CtrLoRA.create_model (the SD weights are not part of the ControlNet)
    base_sd = load_state_dict(str(export / f"base.{fmt}"), location="cpu")
    base_sd = {k: v for k, v in base_sd.items() if k.startswith("control_model") and not check_key(k)}
    res = holder.load_state_dict(base_sd, strict=False)
    report = {"base_keys_loaded": len(base_sd), "base_unexpected": list(res.unexpected_keys), "adapters": {},
              "skipped_imports": skipped, "lora_rank": rank, "controlnet_kwargs": kwargs}
    loaded = set(base_sd)
    for i, (name, sd) in enumerate(zip(names, adapter_sds)):
        sd = {k: v for k, v in sd.items() if check_key(k)}
        cn.switch_lora(i)
        res = holder.load_state_dict(sd, strict=False)
        cn.copy_weights_to_switchable()
        report["adapters"][name] = {"keys_loaded": len(sd), "unexpected": list(res.unexpected_keys)}
        loaded |= set(sd)
    # every tensor of the network proper must have come from a file; the per-adapter stores
    # (loras_list, zero_convs_list, norms_list) and the switchable layers' aliases are filled above
    aliases = ("loras_list.", "zero_convs_list.", "norms_list.", ".conv_layer.", ".norm_layer.")
    own = [k for k in holder.state_dict() if not any(a in k for a in aliases)]
    report["not_loaded"] = sorted(set(own) - loaded)
    report["loaded"] = not report["not_loaded"] and not report["base_unexpected"] and not any(
        a["unexpected"] for a in report["adapters"].values())

    out = {}
    cn.eval()
    with torch.no_grad():
        for i, name in enumerate(names):
            cn.switch_lora(i)
            outs = cn(hint=inputs[f"hint.{name}"], timesteps=inputs["timesteps"], context=inputs["context"])
            if len(outs) != N_RESIDUALS:
                raise SystemExit(f"reference returned {len(outs)} residuals, expected {N_RESIDUALS}")
            for j, o in enumerate(outs):
                out[f"reference/{name}/{j}"] = o * 1  # control_scales = [1] * 13, as the API sets them
    return out, report


# ---------------------------------------------------------------------- ComfyUI + Advanced-ControlNet
def run_comfyui(comfy_src: Path, acn_src: Path, export: Path, names: list[str], fmt: str,
                inputs: dict) -> tuple[dict, dict]:
    import torch

    sys.path.insert(0, str(comfy_src))
    argv, sys.argv = sys.argv, [str(comfy_src / "main.py"), "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()  # what ComfyUI's main.py does, so `--cpu` takes effect
    import comfy.model_management
    import comfy.ops
    import comfy.utils
    import comfy.weight_adapter

    sys.argv = argv
    skipped: list[str] = []
    det, s = definitions_from_source(comfy_src / "comfy" / "model_detection.py",
                                     ["count_blocks", "calculate_transformer_depth", "detect_unet_config"])
    skipped += s
    acn, s = definitions_from_source(acn_src / "adv_control" / "control_ctrlora.py", ["ControlNetCtrLoRA"])
    skipped += s
    sd15_config = class_constant(comfy_src / "comfy" / "supported_models.py", "SD15", "unet_config")
    sd15_extra = class_constant(comfy_src / "comfy" / "supported_models.py", "SD15", "unet_extra_config")
    base_extra = class_constant(comfy_src / "comfy" / "supported_models_base.py", "BASE", "unet_extra_config")

    files = adapter_files(export, names, fmt)
    report: dict = {"skipped_imports": skipped, "adapters": {}}
    out = {}
    for name, lora_path in zip(names, files):
        # load_ctrlora: base file checks, config detection, model, strict=False load
        base = comfy.utils.load_torch_file(str(export / f"base.{fmt}"), safe_load=True)
        if not any("lora_layer" in k for k in base):
            raise SystemExit(f"{export / f'base.{fmt}'}: no lora_layer keys (the loader refuses such a base)")
        if "control_model.zero_convs.0.0.weight" not in base:
            raise SystemExit("base file lacks control_model.zero_convs.0.0.weight (the loader cannot place it)")
        config = det["detect_unet_config"](base, "control_model.")
        matched = all(k in config and config[k] == v for k, v in sd15_config.items())
        config.update(sd15_extra if matched else base_extra)
        unet_dtype = comfy.model_management.unet_dtype(model_params=-1, supported_dtypes=[
            torch.float16, torch.bfloat16, torch.float32, comfy.utils.weight_dtype(base)])
        load_device = comfy.model_management.get_torch_device()
        manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
        config["operations"] = comfy.ops.pick_operations(unet_dtype, manual_cast)
        config["dtype"] = unet_dtype
        config["device"] = comfy.model_management.unet_offload_device()
        config.pop("out_channels")
        config["hint_channels"] = 3
        model = acn["ControlNetCtrLoRA"](**config)

        class WeightsLoader(torch.nn.Module):
            pass

        w = WeightsLoader()
        w.control_model = model
        missing, unexpected = w.load_state_dict(base, strict=False)
        entry = {"model_table": "SD15" if matched else "BASE", "detected": {k: v for k, v in config.items()
                 if k not in ("operations", "dtype", "device")}, "dtype": str(unet_dtype),
                 "base_missing": list(missing),
                 "base_unexpected_non_lora": [k for k in unexpected if "lora_layer" not in k],
                 "base_unexpected_lora": sum(1 for k in unexpected if "lora_layer" in k)}

        # load_lora_data: keys with lora_layer become LoRA patches, the rest `set` patches
        data = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        if not any("lora_layer" in k for k in data):
            raise SystemExit(f"{lora_path}: no lora_layer keys (the loader refuses such a file)")
        sets = {k.replace("control_model.", ""): v for k, v in data.items() if "lora_layer" not in k}
        loras = {}
        for k in data:
            if "lora_layer" in k and ".up." not in k:
                loras[k.replace("lora_layer.down.", "").replace("control_model.", "")] = (
                    data[k.replace(".down.", ".up.")], data[k])
        model_sd = model.state_dict()
        entry["patch_keys_not_in_model"] = sorted(k for k in [*sets, *loras] if k not in model_sd)
        entry["set_patches"], entry["lora_patches"] = len(sets), len(loras)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in sets.items():
                if k in params:
                    params[k].copy_(v)
            for k, (up, down) in loras.items():
                if k in params:
                    adapter = comfy.weight_adapter.LoRAAdapter(set(), (up, down, None, None, None, None))
                    weight = params[k].detach().clone()
                    params[k].copy_(adapter.calculate_weight(weight, k, 1.0, 1.0, None, lambda a: a))
        entry["loaded"] = not missing and not entry["base_unexpected_non_lora"] and not entry["patch_keys_not_in_model"]
        report["adapters"][name] = entry

        model.eval()
        hint = inputs[f"hint.{name}"]
        x = torch.zeros_like(hint)  # the class takes the noisy latent only for its dtype
        with torch.no_grad():
            res = model(x, hint, inputs["timesteps"], inputs["context"])
        outs = list(res["output"]) + list(res["middle"])
        if len(outs) != N_RESIDUALS:
            raise SystemExit(f"ComfyUI returned {len(outs)} residuals, expected {N_RESIDUALS}")
        for j, o in enumerate(outs):
            out[f"comfyui/{name}/{j}"] = o
    report["loaded"] = all(a["loaded"] for a in report["adapters"].values())
    return out, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, required=True, help="folder written by `ctrlora export`")
    p.add_argument("--adapter", action="append", required=True, help="condition name (file stem); repeat")
    p.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors")
    p.add_argument("--inputs", type=Path, required=True,
                   help="safetensors with timesteps, context and hint.<adapter> (condition latents)")
    p.add_argument("--loader", action="append", choices=("reference", "comfyui"), default=None)
    p.add_argument("--ctrlora-src", type=Path, help="checkout of the CtrLoRA reference code")
    p.add_argument("--comfyui-src", type=Path, help="checkout of ComfyUI")
    p.add_argument("--acn-src", type=Path, help="checkout of ComfyUI-Advanced-ControlNet")
    p.add_argument("--out", type=Path, required=True, help="safetensors of the residuals")
    p.add_argument("--report", type=Path, required=True, help="JSON report")
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    inputs = load_file(str(args.inputs))
    loaders = args.loader or ["reference", "comfyui"]
    out, report = {}, {}
    if "reference" in loaders:
        if not args.ctrlora_src:
            p.error("--ctrlora-src is needed for the reference loader")
        o, r = run_reference(args.ctrlora_src, args.export, args.adapter, args.format, inputs)
        out.update(o)
        report["reference"] = r
    if "comfyui" in loaders:
        if not (args.comfyui_src and args.acn_src):
            p.error("--comfyui-src and --acn-src are needed for the comfyui loader")
        o, r = run_comfyui(args.comfyui_src, args.acn_src, args.export, args.adapter, args.format, inputs)
        out.update(o)
        report["comfyui"] = r
    save_file({k: v.detach().contiguous() for k, v in out.items()}, str(args.out))
    args.report.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
