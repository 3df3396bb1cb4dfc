"""Where sampling runs when the caller does not say: the GPU when one is visible, else the CPU.

One rule for everything that builds a pipeline or moves a frozen model by itself: the
evaluation, the frozen-benchmark gate, the registered model, the embed stage. The trainers get
the same choice from accelerate (``Accelerator()`` takes the GPU when there is one).

The switch that forces it is CUDA's own ``CUDA_VISIBLE_DEVICES``, because it reaches every one
of them, accelerate included: ``CUDA_VISIBLE_DEVICES=`` (empty) runs the whole graph on the CPU,
``CUDA_VISIBLE_DEVICES=1`` on the second card. A setting of this project's own would reach our
code but not accelerate's device choice, and the two would disagree.
"""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """``cuda`` (the first visible card) when torch sees a GPU, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
