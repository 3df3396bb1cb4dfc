import pipelines  # noqa: F401  (tool defaults: telemetry off, stores inside the repo) before anything else
