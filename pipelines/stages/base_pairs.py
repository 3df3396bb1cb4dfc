"""DVC stage ``base_pairs`` (params: ``base_refresh``, ``train_base.conditions``): record which
training scans the shared base trains on (``paths.base_pairs``), by content.

The record is refreshed to the whole training split of the embed cache when that split has grown
by ``base_refresh.growth`` since it was written, or when a recorded scan, the backbone or the base
conditions changed; otherwise the file is left untouched, so `train_base` (which depends on the
record, not on the whole cache) does not rerun and only the adapters retrain on new scans
(:mod:`ctrlora.training.base_pairs`). A persistent output: DVC keeps it across reruns."""
from __future__ import annotations

import json
import sys

import pipelines  # noqa: F401  (tool defaults)
from pipelines.stages.common import artefact_paths, read_params, timed_stage


def main() -> int:
    from safetensors import safe_open

    from ctrlora.training.base_pairs import decide, read_record, record_of, training_rows, write_record
    from ctrlora.training.embed_update import read_keys

    allp, paths = read_params("base_refresh", "train_base"), artefact_paths()
    growth = float(allp["base_refresh"]["growth"])
    conditions = list(allp["train_base"]["conditions"])
    embed, out = paths["embed"], paths["base_pairs"]
    with timed_stage("base_pairs"):
        index = json.loads((embed / "index.json").read_text())
        keys = read_keys(embed, paths["embed_keys"])
        photo_index = {}
        for c in conditions:
            with safe_open(str(embed / "conditions" / f"{c}.safetensors"), framework="pt") as f:
                photo_index[c] = f.get_tensor("photo_index").tolist()
        current = record_of(training_rows(index, keys, photo_index, conditions), keys["backbone_hash"], conditions)
        record, why = decide(read_record(out), current, growth)
        written = write_record(record, out)
        print(f"[base_pairs] {len(record['scans'])} of {len(current['scans'])} training scans for the base "
              f"({why}); {'written' if written else 'unchanged'}: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
