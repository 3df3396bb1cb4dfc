"""CtrLoRA for dental imaging: a Base ControlNet plus per-condition LoRA adapters on diffusers + peft."""

__version__ = "0.1.0"
