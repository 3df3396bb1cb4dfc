"""Evaluation toolkit: metric functions (:mod:`.metrics`), condition re-detectors
(:mod:`.detectors`), fidelity glue and primary metrics (:mod:`.fidelity`), image grids and
curves (:mod:`.grids`). See docs/evaluation.md."""
