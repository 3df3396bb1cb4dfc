"""What runs the graphs and keeps them honest: :mod:`.repro` (``make repro``: ``dvc repro``, then
the register step), :mod:`.flows` (the Prefect flows, serve / watch), :mod:`.ingest` (landed scans
into the accepted store), :mod:`.dvc_deps` (every stage's ``.py`` deps from its imports) and
:mod:`.report` (the README's result tables)."""
