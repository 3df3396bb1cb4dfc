"""The registered model: an MLflow pyfunc wrapping backbone + base ControlNet + one adapter.

A version's artifacts are the ``adapter`` directory and ``parts``, the reference to the backbone
and base ControlNet it was registered with (each stored once per content hash, fetched from the
tracking store's artifacts and checked against that hash: :func:`pipelines.registry.models.fetch_parts`);
versions registered before the parts were shared carry ``backbone`` and ``base`` directories
themselves. :meth:`CtrLoRAPyfunc.load_context` builds a :class:`~ctrlora.sampling.CtrLoRAPipeline`.
The model is logged as code (:mod:`pipelines.registry.pyfunc_model`), not pickled: loading a version runs
that file, which imports this class from the installed ``ctrlora-dental`` package.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc
import pandas as pd

IMAGE_COLUMN = "image"
CONDITION_COLUMN = "condition_image"
# What a version without a recorded recipe samples with; a version's recipe.json (the sampling
# its metrics were measured with: scheduler, steps, guidance_scale, weight) replaces these.
DEFAULTS: dict[str, Any] = {"prompt": "", "weight": 1.0, "seed": 0, "steps": 20,
                            "guidance_scale": 7.5, "scheduler": "ddim"}


def _signature():
    """The input every version accepts: the condition map (PNG bytes; base64 text over REST) and
    optional per-row overrides of the recipe; the output, one PNG per row."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    optional = [("prompt", "string"), ("weight", "double"), ("seed", "long"), ("steps", "long"),
                ("guidance_scale", "double"), ("scheduler", "string")]
    inputs = Schema([ColSpec("binary", CONDITION_COLUMN)]
                    + [ColSpec(kind, name, required=False) for name, kind in optional])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("binary", IMAGE_COLUMN)]))


SIGNATURE = _signature()


def _decode_image(value: Any):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str):
        value = base64.b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value))).convert("RGB")
    raise TypeError(f"{CONDITION_COLUMN}: expected PNG bytes or base64 str, "
                    f"got {type(value).__name__}")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _cell(row: Mapping, key: str, fallback: Any) -> Any:
    """``row[key]``, or ``fallback`` where the row has no value (absent, None or NaN)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return fallback
    return value


class CtrLoRAPyfunc(mlflow.pyfunc.PythonModel):
    """backbone + base ControlNet + one condition adapter → images.

    Input: a pandas DataFrame with ``condition_image`` (PNG bytes or base64 str) and optional
    ``prompt`` (""), ``weight``, ``seed`` (0), ``steps``, ``guidance_scale``, ``scheduler``;
    where a row gives none, the version's recipe (the sampling it was evaluated with) decides,
    else :data:`DEFAULTS`. ``params`` may set them for rows that do not. Runs on the GPU when
    one is present. Output: a DataFrame with one column ``image`` holding PNG bytes.
    """

    def load_context(self, context) -> None:
        from ctrlora.models.adapters import read_adapter_config
        from ctrlora.sampling import CtrLoRAPipeline

        arts = dict(context.artifacts)
        if "parts" in arts:
            from pipelines.registry.models import fetch_parts

            arts.update({k: str(v) for k, v in fetch_parts(arts["parts"]).items()})
        from pipelines.stages.common import resolve_backbone

        import json

        import torch

        adapter = Path(arts["adapter"])
        self.condition = read_adapter_config(adapter)["condition"]
        self.recipe = dict(DEFAULTS)
        if arts.get("recipe"):
            self.recipe.update(json.loads(Path(arts["recipe"]).read_text()))
        # at SD scale the backbone part is the record of a local SD 1.5 directory
        self.pipe = CtrLoRAPipeline.from_pretrained_parts(
            str(resolve_backbone(Path(arts["backbone"]))), arts["base"], {self.condition: str(adapter)})
        if torch.cuda.is_available():
            self.pipe = self.pipe.to("cuda")

    # The version's explicit signature (SIGNATURE) declares the columns; MLflow checks every
    # request against it and decodes base64 text of the binary column over REST.
    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if CONDITION_COLUMN not in frame.columns:
            raise ValueError(f"model input needs a {CONDITION_COLUMN!r} column; "
                             f"got {list(frame.columns)}")
        fallback = {**getattr(self, "recipe", DEFAULTS), **(params or {})}
        images = []
        for row in frame.to_dict("records"):
            image = _decode_image(row[CONDITION_COLUMN])
            weight = float(_cell(row, "weight", fallback["weight"]))
            out = self.pipe(
                str(_cell(row, "prompt", fallback["prompt"])),
                conditions={self.condition: (image, weight)},
                num_inference_steps=int(_cell(row, "steps", fallback["steps"])),
                guidance_scale=float(_cell(row, "guidance_scale", fallback["guidance_scale"])),
                scheduler=str(_cell(row, "scheduler", fallback["scheduler"])),
                seed=int(_cell(row, "seed", fallback["seed"])),
                output_type="pil",
                progress=False,
            )
            images.append(_png_bytes(out.images[0]))
        return pd.DataFrame({IMAGE_COLUMN: images})
