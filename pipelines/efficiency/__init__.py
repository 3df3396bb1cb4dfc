"""Stage entries of the data-efficiency graph (``efficiency/dvc.yaml``, docs/efficiency.md)."""
