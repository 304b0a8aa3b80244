"""The script MLflow runs to load the registered model ("models from code")."""

import mlflow

from xmodal_runtime.pyfunc import DualEncoderPyfunc

mlflow.models.set_model(DualEncoderPyfunc())
