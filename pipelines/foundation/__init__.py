"""Stage entries of the foundation graph (``foundation/dvc.yaml``, ``make foundation``).

The foundation is what a real deployment downloads instead of training: the tiny latent-diffusion
backbone that stands in for Stable Diffusion 1.5, and the re-detectors that are the evaluation's
yardstick. It is pretrained once, from the rendered scans' training split alone, and its weights
are committed (git-tracked outputs). The production graph reads them as inputs, as it reads a
local SD 1.5, so new scans never retrain them.

``foundation/`` is a DVC project of its own (``dvc init --subdir``): the production graph's
``dvc repro`` does not see these stages, and ``cd foundation && dvc repro`` does not see the
production stages."""
