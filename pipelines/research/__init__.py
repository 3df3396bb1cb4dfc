"""Stage entries of the research graph (``research/dvc.yaml``, ``make research``; docs/research.md):
``python -m pipelines.research.<entry>`` for ``train`` (sweep / seeds), ``select``, ``evaluate``
and ``report``, on the helpers of :mod:`.common`."""
