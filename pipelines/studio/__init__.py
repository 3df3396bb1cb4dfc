"""The studio (``ctrlora-ops studio``, ``make studio``; docs/studio.md): a local review page over the
registry. :mod:`.app` holds the state, checks, jobs and the FastAPI app, :mod:`.page` the single
HTML page it serves, :mod:`.shots` the documentation's screenshots (``python -m
pipelines.studio.shots``)."""
