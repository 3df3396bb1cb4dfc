"""Models-from-code entry of the registered CtrLoRA model.

MLflow stores this file with every version (``python_model=<this path>``) and runs it when the
version is loaded; it names the model class instead of pickling an instance, so loading a
version never unpickles anything. The class comes from the installed ``ctrlora-dental`` package.
"""
import mlflow.models

from pipelines.registry.pyfunc import CtrLoRAPyfunc

mlflow.models.set_model(CtrLoRAPyfunc())
