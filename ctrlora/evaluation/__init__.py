"""Evaluation toolkit: metric functions (:mod:`.metrics`), condition re-detectors
(:mod:`.detectors`), per-scan fidelity and primary metrics (:mod:`.fidelity`), paired bootstrap
intervals (:mod:`.stats`), the quality bar (:mod:`.quality_bar`), image grids and curves
(:mod:`.grids`), and the evaluation run in phases — loading (:mod:`.loading`), detectors
(:mod:`.detector_cache`), generation (:mod:`.generation`), scoring (:mod:`.scoring`) — driven by
:mod:`.run`. See docs/evaluation.md."""
