"""The registered model: an MLflow pyfunc wrapping backbone + base ControlNet + condition adapters.

Two kinds of registered model share this class:

* ``ctrlora-<c>`` versions hold **one** condition's adapter (artifact ``adapter``) and
  ``parts``, the reference to the backbone and base ControlNet they were registered with (each
  stored once per content hash, fetched from the tracking store's artifacts and checked against
  that hash: :func:`pipelines.registry.models.fetch_parts`); versions registered before the
  parts were shared carry ``backbone`` and ``base`` directories themselves.
* ``ctrlora+<c1>+<c2>...`` versions (:mod:`pipelines.registry.combination`) hold no weights of
  their own: their ``parts`` also reference one adapter per condition, by content hash.

Both carry ``recipe`` (``recipe.json``): the sampling their figures were measured with. A
one-condition recipe states its residual ``weight``, a combination's its ``weights`` per
condition. :meth:`CtrLoRAPyfunc.load_context` builds one :class:`~ctrlora.sampling.CtrLoRAPipeline`
with every adapter; a request combines any subset of them as the weighted sum of their ControlNet
residuals, and one condition is the special case.

The request is a long table: **one row per condition of a sample** (:func:`plan_requests`).
Conditions are values of the ``condition`` column, not columns of their own, so a condition the
model lacks reaches the model and is refused with a clear error instead of being dropped by
MLflow's schema check as an unknown column. The model is logged as code
(:mod:`pipelines.registry.pyfunc_model`), not pickled: loading a version runs that file, which
imports this class from the installed ``ctrlora-dental`` package.
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

IMAGE_COLUMN = "image"
CONDITION_COLUMN = "condition_image"
NAME_COLUMN = "condition"
REQUEST_COLUMN = "request"
# What a version without a recorded recipe samples with; a version's recipe.json (the sampling
# its metrics were measured with: scheduler, steps, guidance_scale, weight or weights) replaces these.
DEFAULTS: dict[str, Any] = {"prompt": "", "weight": 1.0, "seed": 0, "steps": 20,
                            "guidance_scale": 7.5, "scheduler": "ddim"}
# Settings of a whole sample: the rows of one request must not disagree on them.
SAMPLE_FIELDS = ("prompt", "seed", "steps", "guidance_scale", "scheduler")


def _signature():
    """The input every version accepts, one row per condition of a sample: the condition map
    (PNG bytes; base64 text over REST), which condition it is, its residual weight, the request
    it belongs to, and optional overrides of the recipe; the output, one PNG per request."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    optional = [(NAME_COLUMN, "string"), ("weight", "double"), (REQUEST_COLUMN, "long"),
                ("prompt", "string"), ("seed", "long"), ("steps", "long"),
                ("guidance_scale", "double"), ("scheduler", "string")]
    inputs = Schema([ColSpec("binary", CONDITION_COLUMN)]
                    + [ColSpec(kind, name, required=False) for name, kind in optional])
    outputs = Schema([ColSpec("long", REQUEST_COLUMN), ColSpec("binary", IMAGE_COLUMN)])
    return ModelSignature(inputs=inputs, outputs=outputs)


SIGNATURE = _signature()


def bad_request(message: str) -> MlflowException:
    """A request the model refuses; ``mlflow models serve`` answers it with HTTP 400 and this
    message (any other exception becomes a generic 400 that hides it)."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode_image(value: Any, where: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value)
        except ValueError:  # bad padding; other stray characters are skipped, and PIL judges the rest
            raise bad_request(f"{where}: {CONDITION_COLUMN} is text but not base64") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(value))).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise bad_request(f"{where}: {CONDITION_COLUMN} is not a readable image ({exc})") from None
    raise bad_request(f"{where}: {CONDITION_COLUMN} must be PNG bytes or base64 text, "
                      f"got {type(value).__name__}")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(row: Mapping, key: str, fallback: Any) -> Any:
    """``row[key]``, or ``fallback`` where the row has no value (absent, None or NaN)."""
    value = row.get(key)
    return fallback if _missing(value) else value


def recipe_of(raw: Mapping[str, Any] | None, conditions: Sequence[str]) -> dict[str, Any]:
    """A version's recipe as the pyfunc uses it: sampler settings over :data:`DEFAULTS` and
    ``weights`` for every condition of the model (a one-condition recipe's ``weight`` is its
    condition's weight; a condition the recipe does not weigh gets ``DEFAULTS["weight"]``)."""
    raw = dict(raw or {})
    recipe = {**{k: v for k, v in DEFAULTS.items() if k != "weight"},
              **{k: v for k, v in raw.items() if k not in ("weight", "weights")}}
    weights = {str(c): float(w) for c, w in (raw.get("weights") or {}).items()}
    if "weight" in raw and len(conditions) == 1:
        weights.setdefault(conditions[0], float(raw["weight"]))
    recipe["weights"] = {c: weights.get(c, float(DEFAULTS["weight"])) for c in conditions}
    return recipe


@dataclass
class Sample:
    """One image to draw: its request id, the conditions ``{name: (image, weight)}`` in the
    model's order, and the sampler settings."""

    request: int
    conditions: dict[str, tuple[Any, float]]
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~ctrlora.sampling.CtrLoRAPipeline` for this sample."""
        return {"prompt": self.prompt, "conditions": self.conditions,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "scheduler": self.scheduler, "seed": self.seed}


def _number(value: Any, name: str, where: str, kind: type = float) -> Any:
    try:
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise bad_request(f"{where}: {name} {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    return number


def plan_requests(frame: pd.DataFrame, conditions: Sequence[str], recipe: Mapping[str, Any],
                  params: Mapping[str, Any] | None = None) -> list[Sample]:
    """Check a request table and group it into samples; nothing is drawn here, so a bad row
    refuses the whole request before any work.

    One row per condition of a sample. ``condition`` names it (may be left out when the model
    has one condition); ``weight`` is its residual weight (default: the recipe's, finite and
    >= 0); rows with the same ``request`` id make one sample (no ``request`` column: every row
    is a sample of its own, its id the row's position). ``prompt``, ``seed``, ``steps``,
    ``guidance_scale``, ``scheduler`` belong to the sample: given on any of its rows, and rows
    that give different values are refused; unset, ``params`` then the recipe decide. Samples
    come out in the order of their first row; their conditions in the model's order (the order
    the pipeline draws their noise in), whatever the order of the rows.
    """
    from ctrlora.sampling import SCHEDULERS

    if CONDITION_COLUMN not in frame.columns:
        raise bad_request(f"model input needs a {CONDITION_COLUMN!r} column; got {list(frame.columns)}")
    if frame.empty:
        raise bad_request("the request has no rows")
    order = list(conditions)
    fallback = {**recipe, **{k: v for k, v in (params or {}).items() if not _missing(v)}}
    grouped = REQUEST_COLUMN in frame.columns
    groups: dict[int, list[tuple[int, dict]]] = {}
    for i, row in enumerate(frame.to_dict("records")):
        if grouped:
            if _missing(row.get(REQUEST_COLUMN)):
                raise bad_request(f"row {i}: no {REQUEST_COLUMN!r} id (give it on every row or on none)")
            key = _number(row[REQUEST_COLUMN], REQUEST_COLUMN, f"row {i}", int)
        else:
            key = i
        groups.setdefault(key, []).append((i, row))

    samples = []
    for key, rows in groups.items():
        where = f"request {key}"
        picked: dict[str, tuple[Any, float]] = {}
        for i, row in rows:
            name = row.get(NAME_COLUMN)
            if _missing(name):
                if len(order) != 1:
                    raise bad_request(f"row {i}: this model combines {order}; name each row's condition "
                                      f"in column {NAME_COLUMN!r}")
                name = order[0]
            name = str(name)
            if name not in order:
                raise bad_request(f"row {i}: condition {name!r} is not in this model; it has {order}")
            if name in picked:
                raise bad_request(f"{where}: condition {name!r} given twice")
            weight = _number(_cell(row, "weight", recipe["weights"][name]), "weight", f"row {i}")
            if not math.isfinite(weight) or weight < 0:
                raise bad_request(f"row {i}: weight of {name!r} must be finite and >= 0, got {weight}")
            picked[name] = (_decode_image(row[CONDITION_COLUMN], f"row {i}"), weight)
        settings = {}
        for field in SAMPLE_FIELDS:
            given = {row[field] for _, row in rows if not _missing(row.get(field))}
            if len(given) > 1:
                raise bad_request(f"{where}: its rows give different {field} values {sorted(map(str, given))}")
            settings[field] = given.pop() if given else fallback[field]
        steps = _number(settings["steps"], "steps", where, int)
        guidance = _number(settings["guidance_scale"], "guidance_scale", where)
        scheduler = str(settings["scheduler"])
        if steps < 1:
            raise bad_request(f"{where}: steps must be >= 1, got {steps}")
        if not math.isfinite(guidance):
            raise bad_request(f"{where}: guidance_scale must be finite, got {guidance}")
        if scheduler not in SCHEDULERS:
            raise bad_request(f"{where}: scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        samples.append(Sample(key, {c: picked[c] for c in order if c in picked}, str(settings["prompt"]),
                              _number(settings["seed"], "seed", where, int), steps, guidance, scheduler))
    return samples


def model_parts(artifacts: Mapping[str, str]) -> tuple[Path, Path, dict[str, Path]]:
    """(backbone dir, base dir, ``{condition: adapter dir}``) of a version's artifacts: its own
    ``adapter`` directory, or the adapters its ``parts`` reference (a combination); backbone and
    base from ``parts`` (fetched and hash-checked) or, in old versions, their own directories."""
    from ctrlora.models.adapters import read_adapter_config

    arts = {k: str(v) for k, v in artifacts.items()}
    adapters: dict[str, Path] = {}
    if "parts" in arts:
        from pipelines.registry.models import fetch_adapters, fetch_parts

        arts.update({k: str(v) for k, v in fetch_parts(arts["parts"]).items()})
        adapters.update(fetch_adapters(arts["parts"]))
    if "adapter" in arts:
        adapter = Path(arts["adapter"])
        adapters[read_adapter_config(adapter)["condition"]] = adapter
    if not adapters:
        raise MlflowException(f"not a CtrLoRA model: no adapter among its artifacts {sorted(arts)}")
    return Path(arts["backbone"]), Path(arts["base"]), dict(sorted(adapters.items()))


class CtrLoRAPyfunc(mlflow.pyfunc.PythonModel):
    """backbone + base ControlNet + condition adapters → images.

    Input: a pandas DataFrame, one row per condition of a sample (:func:`plan_requests`):
    ``condition_image`` (PNG bytes or base64 str) and optional ``condition``, ``weight``,
    ``request``, ``prompt`` (""), ``seed`` (0), ``steps``, ``guidance_scale``, ``scheduler``;
    what a request leaves unset the version's recipe (the sampling it was evaluated with)
    decides, else :data:`DEFAULTS`. ``params`` may set the sampler settings for requests that do
    not. Runs on the GPU when one is present. Output: a DataFrame with ``request`` and ``image``
    (PNG bytes), one row per sample.
    """

    def load_context(self, context) -> None:
        import torch

        from ctrlora.sampling import CtrLoRAPipeline
        from pipelines.stages.common import resolve_backbone

        backbone, base, adapters = model_parts(context.artifacts)
        self.conditions = list(adapters)
        raw = context.artifacts.get("recipe")
        self.recipe = recipe_of(json.loads(Path(raw).read_text()) if raw else None, self.conditions)
        # at SD scale the backbone part is the record of a local SD 1.5 directory
        self.pipe = CtrLoRAPipeline.from_pretrained_parts(
            str(resolve_backbone(backbone)), base, {c: str(d) for c, d in adapters.items()})
        if torch.cuda.is_available():
            self.pipe = self.pipe.to("cuda")

    # The version's explicit signature (SIGNATURE) declares the columns; MLflow checks every
    # request against it and decodes base64 text of the binary column over REST.
    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        samples = plan_requests(frame, self.conditions, self.recipe, params)
        images = []
        for s in samples:
            out = self.pipe(**s.call_kwargs(), output_type="pil", progress=False)
            images.append(_png_bytes(out.images[0]))
        return pd.DataFrame({REQUEST_COLUMN: [s.request for s in samples], IMAGE_COLUMN: images})
