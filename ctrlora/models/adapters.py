"""Per-condition adapters on a :class:`~ctrlora.models.controlnet.CtrLoRAControlNet`, via peft.

An adapter of CtrLoRA is

* LoRA of rank ``r`` (``lora_alpha = r``, i.e. scale 1 as in the reference) on **every**
  ``nn.Linear`` of the ControlNet (82 at SD scale; no conv), and
* the condition's own copies of the zero convs (``controlnet_down_blocks.*``,
  ``controlnet_mid_block``) and of the spatial-transformer norms (``<transformer>.norm`` and
  ``norm1/2/3`` of every transformer block) -- peft ``modules_to_save``; the copies start from the
  base's values. ResBlock GroupNorms stay shared.

Many adapters live in one model and are switched by name (:func:`set_adapter`). An adapter is
added in one of two kinds:

``own_modules=True`` (default; new conditions, loaded / converted adapters)
    LoRA + own zero convs + own norms.
``own_modules=False`` (base training)
    LoRA only. The shared base zero convs and norms (the wrapped ``original_module``) are used
    and trained together with the base, as in the reference's base training. Exporting such an
    adapter (:func:`save_adapter`) writes its LoRA plus the base's current zero convs / norms,
    which is exactly what the reference's weight extraction ships for a base condition.

Trainable sets (:func:`set_trainable`): ``"base"`` = every base parameter (incl. shared zero
convs and norms) + the active adapter's LoRA; ``"adapter"`` = only the active adapter's LoRA,
zero convs and norms.

Adapter directory: ``adapter_model.safetensors`` (only that adapter's tensors, named
``<linear>.lora_A.weight`` / ``<linear>.lora_B.weight`` and ``<module>.weight`` / ``.bias`` for
the zero convs and norms, with the base model's module names) + ``adapter_config.json``.

Several adapters in one batched forward: :func:`mixed_adapters` (or the ControlNet's
``adapter_names=`` argument) gives every sample its own adapter.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import types
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_NAME = "__base__"  # peft's name for "no adapter" in a mixed batch
FORMAT = "ctrlora-adapter/1"
_PEFT_PARTS = {"lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
               "lora_magnitude_vector", "modules_to_save"}


# ---------------------------------------------------------------------- structure
def _peft():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    return LoraConfig, LoraLayer, BaseTunerLayer, ModulesToSaveWrapper


def _clean_name(name: str) -> str | None:
    """Base-model name of a (possibly peft-wrapped) module/param name; None for adapter parts."""
    parts = name.split(".")
    if any(p in _PEFT_PARTS for p in parts):
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def _base_module(module: nn.Module) -> nn.Module:
    _, _, BaseTunerLayer, ModulesToSaveWrapper = _peft()
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{base name: base module}`` -- wrappers resolved to what they wrap."""
    _, _, BaseTunerLayer, ModulesToSaveWrapper = _peft()
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        clean = _clean_name(name)
        if clean is None or clean in out:
            continue
        out[clean] = _base_module(module)
    return out


def lora_targets(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of the ControlNet (the LoRA targets)."""
    return [n for n, m in _base_modules(model).items() if isinstance(m, nn.Linear)]


def condition_modules(model: nn.Module) -> list[str]:
    """Names of the modules every condition owns a copy of: the zero convs, then the norms of the
    spatial transformers (``norm`` GroupNorm + ``norm1/2/3`` LayerNorms of each block)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    mods = _base_modules(model)
    n_down = len(model.controlnet_down_blocks)
    names = [f"controlnet_down_blocks.{i}" for i in range(n_down)] + ["controlnet_mid_block"]
    for name, m in mods.items():
        if isinstance(m, Transformer2DModel):
            names.append(f"{name}.norm")
        elif isinstance(m, BasicTransformerBlock):
            names += [f"{name}.norm1", f"{name}.norm2", f"{name}.norm3"]
    missing = [n for n in names if n not in mods]
    if missing:
        raise RuntimeError(f"model lacks expected modules {missing[:5]}")
    return names


def adapter_layout(model: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of one adapter of ``rank`` in the file format of this module."""
    mods = _base_modules(model)
    layout: dict[str, tuple[int, ...]] = {}
    for name in lora_targets(model):
        lin = mods[name]
        layout[f"{name}.lora_A.weight"] = (rank, lin.in_features)
        layout[f"{name}.lora_B.weight"] = (lin.out_features, rank)
    for name in condition_modules(model):
        for pname, p in mods[name].named_parameters():
            layout[f"{name}.{pname}"] = tuple(p.shape)
    return layout


def adapter_param_counts(model: nn.Module, rank: int) -> dict[str, int]:
    """Parameter counts of one adapter: ``lora``, ``zero_convs``, ``norms``, ``total``."""
    counts = {"lora": 0, "zero_convs": 0, "norms": 0}
    for name, shape in adapter_layout(model, rank).items():
        n = 1
        for s in shape:
            n *= s
        key = "lora" if ".lora_" in name else ("zero_convs" if name.startswith("controlnet_") else "norms")
        counts[key] += n
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------- registry on the model
def _registry(model: nn.Module) -> dict[str, dict]:
    reg = getattr(model, "_ctrlora_adapters", None)
    if reg is None:
        reg = {}
        object.__setattr__(model, "_ctrlora_adapters", reg)
    return reg


def list_adapters(model: nn.Module) -> dict[str, dict]:
    """``{name: {"rank", "alpha", "own_modules"}}`` of the adapters in ``model``."""
    return {k: dict(v) for k, v in _registry(model).items()}


def has_adapters(model: nn.Module) -> bool:
    _, _, BaseTunerLayer, ModulesToSaveWrapper = _peft()
    return any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in model.modules())


def _require(model: nn.Module, name: str) -> dict:
    reg = _registry(model)
    if name not in reg:
        raise KeyError(f"no adapter named {name!r}; adapters: {sorted(reg)}")
    return reg[name]


# ---------------------------------------------------------------------- add / switch
def add_adapter(
    model: nn.Module,
    name: str,
    rank: int = 128,
    alpha: float | None = None,
    own_modules: bool = True,
    init_lora_weights: bool | str = "gaussian",
) -> str:
    """Add adapter ``name`` (fresh LoRA: A gaussian std 1/r as the reference, B zero; own zero
    convs / norms copied from the base's current values when ``own_modules``) and make it the
    active adapter. Existing parameters keep their ``requires_grad``; the new adapter's start
    frozen -- :func:`set_trainable` decides what trains."""
    LoraConfig, _, _, ModulesToSaveWrapper = _peft()
    from peft import inject_adapter_in_model

    if not name or "." in name or name == BASE_NAME:
        raise ValueError(f"invalid adapter name {name!r}")
    reg = _registry(model)
    if name in reg:
        raise ValueError(f"adapter {name!r} already exists")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    targets = lora_targets(model)
    owned = condition_modules(model) if own_modules else None
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(targets),
        modules_to_save=list(owned) if owned else None,
        init_lora_weights=init_lora_weights,
    )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with warnings.catch_warnings():  # "already found a peft_config": several adapters is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    # peft freezes the base on a first injection and marks the new adapter trainable; undo both:
    # existing parameters keep their flags, the new adapter starts frozen (see set_trainable)
    known = {id(p) for p, _ in flags}
    for p in model.parameters():
        if id(p) not in known:
            p.requires_grad_(False)
    for p, flag in flags:
        p.requires_grad_(flag)
    reg[name] = {"rank": rank, "alpha": alpha, "own_modules": bool(own_modules)}
    if own_modules:  # the copies must be exactly the base's values (peft deep-copies them)
        mods = dict(model.named_modules())
        for m in owned:
            w = mods[m]
            if not isinstance(w, ModulesToSaveWrapper) or name not in w.modules_to_save:
                raise RuntimeError(f"peft did not create the copy of {m} for adapter {name!r}")
    set_adapter(model, name)
    return name


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter; ``None`` (or ``"__base__"``) = base ControlNet only.
    ``requires_grad`` flags are left exactly as they were (peft's own switching toggles them;
    here only :func:`set_trainable` decides), so switching per step inside training is safe."""
    from peft.functional import set_adapter as peft_set_adapter

    _, _, BaseTunerLayer, ModulesToSaveWrapper = _peft()
    if name is not None and name != BASE_NAME:
        _require(model, name)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    try:
        if name is None or name == BASE_NAME:
            for m in layers:
                m.enable_adapters(False)
            object.__setattr__(model, "_ctrlora_active", None)
        else:
            for m in layers:
                m.enable_adapters(True)
            peft_set_adapter(model, name)
            object.__setattr__(model, "_ctrlora_active", name)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "_ctrlora_active", None)


def delete_adapter(model: nn.Module, name: str) -> None:
    from peft.functional import delete_adapter as peft_delete

    _require(model, name)
    peft_delete(model, name, prefix="lora_")
    del _registry(model)[name]
    if active_adapter(model) == name:
        set_adapter(model, None)


# ---------------------------------------------------------------------- parameters
def _adapter_param_names(model: nn.Module, name: str) -> list[str]:
    """Model parameter names that belong to adapter ``name``."""
    out = []
    for pname, _ in model.named_parameters():
        parts = pname.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in _PEFT_PARTS and parts[i + 1] == name:
                out.append(pname)
                break
    return out


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{base name: parameter}`` of the shared base (wrapped originals included)."""
    out = {}
    for pname, p in model.named_parameters():
        clean = _clean_name(pname)
        if clean is not None:
            out[clean] = p
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base ControlNet's state dict with base names, no adapter tensors."""
    out = {}
    for k, v in model.state_dict().items():
        clean = _clean_name(k)
        if clean is not None:
            out[clean] = v
    return out


def base_hash(model: nn.Module) -> str:
    """sha256 of the base ControlNet's tensors (names, dtypes, shapes, bytes) -- what an adapter
    records as the base it was trained on. Independent of adapters and of the file format."""
    h = hashlib.sha256()
    for k, v in sorted(base_state_dict(model).items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def set_trainable(model: nn.Module, mode: str, adapter: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` on exactly one trainable set and activate ``adapter``.

    ``mode="base"``: base training -- all shared base parameters (incl. the shared zero convs and
    norms) + ``adapter``'s LoRA. The adapter must be LoRA-only (``own_modules=False``).
    ``mode="adapter"``: new condition -- only ``adapter``'s LoRA, zero convs and norms.
    Returns the trainable parameters (for the optimiser)."""
    if mode not in ("base", "adapter"):
        raise ValueError(f"mode must be 'base' or 'adapter', got {mode!r}")
    info = _require(model, adapter)
    if mode == "base" and info["own_modules"]:
        raise ValueError(
            f"adapter {adapter!r} has its own zero convs / norms; base training shares them -- "
            "add base-condition adapters with own_modules=False"
        )
    if mode == "adapter" and not info["own_modules"]:
        raise ValueError(f"adapter {adapter!r} is LoRA-only; a new condition needs own_modules=True")
    set_adapter(model, adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    names = set(_adapter_param_names(model, adapter))
    if mode == "base":
        names |= {n for n, _ in model.named_parameters() if _clean_name(n) is not None}
    params = []
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(True)
            params.append(p)
    return params


# ---------------------------------------------------------------------- tensors of one adapter
def adapter_tensor_refs(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``{file key: live model tensor}`` for adapter ``name`` (shared originals for LoRA-only):
    the tensors themselves, so an in-place edit changes the model (:func:`adapter_state_dict`
    gives copies)."""
    info = _require(model, name)
    mods = dict(model.named_modules())
    refs: dict[str, torch.Tensor] = {}
    for t in lora_targets(model):
        layer = mods[t]
        refs[f"{t}.lora_A.weight"] = layer.lora_A[name].weight
        refs[f"{t}.lora_B.weight"] = layer.lora_B[name].weight
    base_mods = _base_modules(model)
    for m in condition_modules(model):
        wrapper = mods[m]
        src = wrapper.modules_to_save[name] if info["own_modules"] else base_mods[m]
        for pname, p in src.named_parameters():
            refs[f"{m}.{pname}"] = p
    return refs


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Copies of adapter ``name``'s tensors, keyed as in the adapter file."""
    return {k: v.detach().clone().contiguous() for k, v in adapter_tensor_refs(model, name).items()}


def save_adapter_tensors(
    tensors: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    condition: str,
    rank: int,
    alpha: float,
    base_hash: str,
    model: nn.Module,
    extra: Mapping | None = None,
) -> Path:
    """Write an adapter directory from a tensor dict (checked against ``model``'s layout)."""
    from safetensors.torch import save_file

    layout = adapter_layout(model, rank)
    _check_keys(tensors, layout, "adapter tensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes its metadata map in a per-process random order, so two
    # keys made the bytes (and DVC's hashes) of identical adapters differ from run to run
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"ctrlora": json.dumps({"condition": condition, "format": FORMAT}, sort_keys=True)})
    config = {
        "format": FORMAT,
        "condition": condition,
        "rank": int(rank),
        "alpha": float(alpha),
        "target_modules": lora_targets(model),
        "modules_to_save": condition_modules(model),
        "base_hash": base_hash,
        "num_tensors": len(tensors),
        "num_params": int(sum(v.numel() for v in tensors.values())),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
    }
    config.update(extra or {})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return out


def save_adapter(model: nn.Module, name: str, out_dir: str | Path, base_hash: str,
                 condition: str | None = None, extra: Mapping | None = None) -> Path:
    """Save adapter ``name`` (only its tensors) + its config. ``base_hash``: the hash of the base
    it was trained with (:func:`base_hash`). For a LoRA-only (base-training) adapter the base's
    zero convs / norms are written as its own."""
    info = _require(model, name)
    extra = {"origin": "own-modules" if info["own_modules"] else "base-training", **(extra or {})}
    return save_adapter_tensors(adapter_state_dict(model, name), out_dir, condition or name,
                                info["rank"], info["alpha"], base_hash, model, extra)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"not an adapter directory (no {ADAPTER_CONFIG}): {adapter_dir}")
    return json.loads(path.read_text())


def _check_keys(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, tuple], what: str,
                against: str = "the model") -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the keys and shapes of ``layout``.
    ``what`` names the tensors and ``against`` what the layout stands for (the messages read
    "<what> do not match <against>: ...")."""
    missing = sorted(set(layout) - set(tensors))
    unknown = sorted(set(tensors) - set(layout))
    if missing or unknown:
        raise ValueError(f"{what} do not match {against}: missing {missing[:10]} "
                         f"({len(missing)}), unexpected {unknown[:10]} ({len(unknown)})")
    wrong = [f"{k}: {tuple(v.shape)} != {layout[k]}" for k, v in tensors.items() if tuple(v.shape) != layout[k]]
    if wrong:
        raise ValueError(f"{what}: shape mismatch with {against}: {wrong[:10]}")


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    name: str | None = None,
    expected_base_hash: str | None = None,
    check_base: bool = True,
    expected_rank: int | None = None,
) -> str:
    """Load an adapter directory into ``model`` as adapter ``name`` (default: its condition) and
    activate it. Refuses an adapter trained on another base (its ``base_hash`` vs
    ``expected_base_hash``, or vs :func:`base_hash` of ``model`` when not given) unless
    ``check_base=False``, and a rank other than ``expected_rank`` or than its tensors'. Every
    expected tensor must be in the file and is verified to have landed in the model."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    name = name or config["condition"]
    rank = int(config["rank"])
    if check_base:
        want = expected_base_hash or base_hash(model)
        if config.get("base_hash") != want:
            raise ValueError(
                f"adapter {adapter_dir} was trained on base {config.get('base_hash')!r}, "
                f"but this base is {want!r}; refusing to load (check_base=False overrides)"
            )
    if expected_rank is not None and rank != expected_rank:
        raise ValueError(f"adapter {adapter_dir} has rank {rank}, expected {expected_rank}")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    a_shapes = {tuple(v.shape)[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    if a_shapes != {rank}:
        raise ValueError(f"adapter {adapter_dir}: config says rank {rank}, LoRA tensors have rank(s) {sorted(a_shapes)}")
    _check_keys(tensors, adapter_layout(model, rank), f"adapter {adapter_dir}")
    add_adapter(model, name, rank=rank, alpha=config.get("alpha", rank), own_modules=True)
    refs = adapter_tensor_refs(model, name)
    if set(refs) != set(tensors):  # cannot happen if layout and refs agree; keep the guarantee
        raise RuntimeError(f"adapter layout mismatch for {name!r}")
    with torch.no_grad():
        for k, t in refs.items():
            t.copy_(tensors[k].to(dtype=t.dtype, device=t.device))
    not_loaded = [k for k, t in refs.items() if not torch.equal(t.detach().cpu(), tensors[k].to(t.dtype))]
    if not_loaded:
        raise RuntimeError(f"adapter {name!r}: tensors not loaded: {not_loaded[:10]}")
    return name


# ---------------------------------------------------------------------- mixed batches
def _wrapper_mixed_forward(wrapper, names: Sequence[str], owners: set[str]):
    """forward for a ModulesToSaveWrapper that gives each sample its adapter's copy (or the shared
    original for ``__base__`` and LoRA-only adapters). peft's own mixed batch refuses norms."""

    def forward(self, x, *args, **kwargs):
        if len(x) != len(names):
            raise ValueError(f"mixed batch: {len(names)} adapter names for a batch of {len(x)}")
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        out = None
        for n, idx in groups.items():
            module = self.modules_to_save[n] if n in owners and n in self.modules_to_save else self.original_module
            index = torch.tensor(idx, device=x.device)
            y = module(x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = y.new_empty((len(names),) + tuple(y.shape[1:]))
            out.index_copy_(0, index, y)
        return out

    return types.MethodType(forward, wrapper)


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block, sample ``i`` of every forward of ``model`` uses adapter
    ``adapter_names[i]`` (``"__base__"`` = no adapter). Lets a pipeline run N conditions x the CFG
    pair in one ControlNet forward. Inference only (no merged weights)."""
    _, LoraLayer, _, ModulesToSaveWrapper = _peft()
    reg = _registry(model)
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_NAME and n not in reg})
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; adapters: {sorted(reg)}")
    owners = {n for n, info in reg.items() if info["own_modules"]}
    handles, patched, disabled = [], [], []

    def pre_hook(_module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    try:
        for m in model.modules():
            if isinstance(m, LoraLayer):
                if m.disable_adapters:
                    m.enable_adapters(True)
                    disabled.append(m)
                handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            elif isinstance(m, ModulesToSaveWrapper):
                m.forward = _wrapper_mixed_forward(m, names, owners)
                patched.append(m)
        yield
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
        for m in disabled:
            m.enable_adapters(False)


def combine_residuals(outputs: Iterable, weights: Sequence[float]):
    """Weighted sum ``sum_i w_i * out_i`` of several ControlNet outputs (residual lists), in the
    reference's order of operations. Returns ``(down_block_res_samples, mid_block_res_sample)``."""
    outputs, weights = list(outputs), list(weights)
    if len(outputs) != len(weights) or not outputs:
        raise ValueError("need one weight per output")
    down, mid = None, None
    for out, w in zip(outputs, weights):
        d = out.down_block_res_samples if hasattr(out, "down_block_res_samples") else out[0]
        m = out.mid_block_res_sample if hasattr(out, "mid_block_res_sample") else out[1]
        if down is None:
            down, mid = [x * w for x in d], m * w
        else:
            down, mid = [a + x * w for a, x in zip(down, d)], mid + m * w
    return down, mid
