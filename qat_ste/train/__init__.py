"""Training: the engine (train / evaluate / TrainConfig), checkpoints, data-parallel helpers, metrics.

    from qat_ste.train import TrainConfig, train, evaluate
    from qat_ste.train.data import load_dataset

The data module (``qat_ste.train.data``) is imported on its own; it is not re-exported here.
``qat_ste.train.engine`` lists the modules the engine is made of.
"""

from .checkpoint import load_checkpoint
from .config import TrainConfig, TrainingDiverged, TrainResult
from .evaluation import evaluate
from .loop import train
from .optim import build_optimizer, parameter_groups

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "build_optimizer", "evaluate", "load_checkpoint",
           "parameter_groups", "train"]
