"""What generated images are worth to a dental team: a tooth segmenter trained with few real
photographs plus generated ones (:mod:`.segmenter`, :mod:`.curves`), and the memorization audit
to run before a generated set is shared (:mod:`.memorization`).

The segmenter here stands for the *user's* model (a MONAI U-Net trained from scratch); it is kept
apart from the evaluation's re-detectors (:mod:`ctrlora.evaluation.detectors`), which are the
project's yardstick for fidelity. MONAI is imported lazily: ``pip install -e .[downstream]``.
"""
