"""The MLflow side of the shell: registering what the graph produced and deciding promotions.

* :mod:`.register` -- the register step after ``dvc repro`` (``python -m pipelines.registry.register``);
* :mod:`.registration` -- registering one adapter (its run, tags, the pyfunc model, the gate);
* :mod:`.models` -- the registered models: aliases, promote / rollback, list, ``models:/`` resolution;
* :mod:`.lock` -- one registration at a time per model;
* :mod:`.gate` -- the promotion rule (pure functions, no MLflow);
* :mod:`.frozen_benchmark` -- the frozen benchmark and the paired comparison on it;
* :mod:`.pyfunc`, :mod:`.pyfunc_model` -- the registered model class and its models-from-code file;
* :mod:`.combination` -- ``ctrlora+<c1>+<c2>...`` models: several champions served as one;
* :mod:`.dvclock` -- the one reader of the hashes DVC recorded in ``dvc.lock``.

Importing this package imports none of them (MLflow loads only where a module needs it)."""
