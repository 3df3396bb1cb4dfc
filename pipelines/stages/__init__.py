"""Stage entries of the production graph (``dvc.yaml``): one module per DVC stage, run as
``python -m pipelines.stages.<module>`` (the stage ``backbone`` runs :mod:`.record_backbone`), and
the helpers they share (:mod:`.common`: params, artefact paths, timing, checkpoints, the backbone
record)."""
