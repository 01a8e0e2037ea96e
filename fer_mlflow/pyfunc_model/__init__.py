"""The served model's old home, kept so models logged before the package had layers still load.

A logged model is "models from code": the script of one logged before runs ``from
fer_mlflow.pyfunc_model import FerEmotionModel``. MLflow puts the model's own copy of the package
first on ``sys.path`` (`mlflow.utils.model_utils._add_code_to_system_path`), but in a process that
has already imported ``fer_mlflow`` (evaluate, predict, ensemble, promote load models in-process)
the package imported answers that import: this module. The model itself lives in
`fer_mlflow.serving.pyfunc_model`; this is a folder, not a file, so that git follows that module's
history (and changes merged onto it) from its old path to its new one.
"""

from fer_mlflow.serving.pyfunc_model import *  # noqa: F401,F403  (what other old callers import)
from fer_mlflow.serving.pyfunc_model import FerEmotionModel  # noqa: F401  (what old scripts import)
