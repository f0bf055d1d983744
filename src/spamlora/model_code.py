"""The code of every logged spamlora model (MLflow's "models from code").

`mlflow_model.log_model` logs this file with the model instead of a pickle of the model
object: loading the model (`mlflow.pyfunc.load_model`, `mlflow models serve`) runs it,
and it builds the model from the spamlora installed there. So loading a model from a
shared store or registry never unpickles anything. Not imported by spamlora itself.
"""

import mlflow

from spamlora.mlflow_model import SpamloraModel

mlflow.models.set_model(SpamloraModel())
