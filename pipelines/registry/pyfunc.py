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
DEFAULTS: dict[str, Any] = {"prompt": "", "weight": 1.0, "seed": 0, "steps": 20,
                            "guidance_scale": 7.5}


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
    ``prompt`` (""), ``weight`` (1.0), ``seed`` (0), ``steps`` (20), ``guidance_scale`` (7.5);
    ``params`` may set ``prompt``, ``steps`` and ``guidance_scale`` for rows that do not.
    Output: a DataFrame with one column ``image`` holding PNG bytes, one row per input row.
    """

    def load_context(self, context) -> None:
        from ctrlora.models.adapters import read_adapter_config
        from ctrlora.sampling import CtrLoRAPipeline

        arts = dict(context.artifacts)
        if "parts" in arts:
            from pipelines.registry.models import fetch_parts

            arts.update({k: str(v) for k, v in fetch_parts(arts["parts"]).items()})
        from pipelines.stages.common import resolve_backbone

        adapter = Path(arts["adapter"])
        self.condition = read_adapter_config(adapter)["condition"]
        # at SD scale the backbone part is the record of a local SD 1.5 directory
        self.pipe = CtrLoRAPipeline.from_pretrained_parts(
            str(resolve_backbone(Path(arts["backbone"]))), arts["base"], {self.condition: str(adapter)})

    # The DataFrame hints tell MLflow not to infer a schema: the input column holds raw PNG
    # bytes or base64 text, which an inferred schema would reject.
    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if CONDITION_COLUMN not in frame.columns:
            raise ValueError(f"model input needs a {CONDITION_COLUMN!r} column; "
                             f"got {list(frame.columns)}")
        fallback = {**DEFAULTS, **(params or {})}
        images = []
        for row in frame.to_dict("records"):
            image = _decode_image(row[CONDITION_COLUMN])
            weight = float(_cell(row, "weight", DEFAULTS["weight"]))
            out = self.pipe(
                str(_cell(row, "prompt", fallback["prompt"])),
                conditions={self.condition: (image, weight)},
                num_inference_steps=int(_cell(row, "steps", fallback["steps"])),
                guidance_scale=float(_cell(row, "guidance_scale", fallback["guidance_scale"])),
                seed=int(_cell(row, "seed", DEFAULTS["seed"])),
                output_type="pil",
                progress=False,
            )
            images.append(_png_bytes(out.images[0]))
        return pd.DataFrame({IMAGE_COLUMN: images})
