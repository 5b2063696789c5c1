"""Training: the engine (train / evaluate / TrainConfig), checkpoints, data-parallel helpers, metrics.

    from qat_ste.train import TrainConfig, train, evaluate
    from qat_ste.train.data import load_dataset

The data module (``qat_ste.train.data``) is imported on its own; it is not re-exported here.
"""

from .checkpoint import load_checkpoint
from .engine import TrainConfig, TrainingDiverged, TrainResult, build_optimizer, evaluate, parameter_groups, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "build_optimizer", "evaluate", "load_checkpoint",
           "parameter_groups", "train"]
