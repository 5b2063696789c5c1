"""The training engine's names in one place (``from qat_ste.train.engine import ...`` keeps working).

The engine is split by job; read it in this order:

- :mod:`~qat_ste.train.loop`: :func:`train` and the loop itself (epochs, steps, end of epoch)
- :mod:`~qat_ste.train.config`: :class:`TrainConfig`, :class:`TrainResult`, :class:`TrainingDiverged`
- :mod:`~qat_ste.train.setup`: what happens before the first step (loader, calibration, wrappers)
- :mod:`~qat_ste.train.optim`: parameter groups, the optimizer and the per-step LR schedule
- :mod:`~qat_ste.train.distill`, :mod:`~qat_ste.train.ema`, :mod:`~qat_ste.train.bn_policy`: the
  fine-tuning recipe (distillation from a float teacher, weight EMA, BatchNorm statistics frozen)
- :mod:`~qat_ste.train.pretrained`: weights from local files (state dicts, timm checkpoints, safetensors)
- :mod:`~qat_ste.train.evaluation`: :func:`evaluate`
- :mod:`~qat_ste.train.precision`: autocast, compile and channels-last settings, input placement
- :mod:`~qat_ste.train.signals`: Ctrl-C / SIGTERM stop the run after the current step
- :mod:`~qat_ste.train.run_state`: the running state, ``last.pt`` and resuming
- :mod:`~qat_ste.train.checkpoint`, :mod:`~qat_ste.train.metrics`, :mod:`~qat_ste.train.distributed`,
  :mod:`~qat_ste.train.data`: checkpoint files, logs and plots, data parallelism, data sets
"""

from __future__ import annotations

from .config import AMP_MODES, AUTO, OPTIMIZERS, SCHEDULES, TrainConfig, TrainingDiverged, TrainResult
from .evaluation import evaluate
from .loop import train
from .optim import NORM_TYPES, build_optimizer, build_scheduler, lr_factor, parameter_groups
from .run_state import RESUME_METADATA_KEYS
from .signals import STOP_SIGNALS, StopRequest

#: the former name of :class:`~qat_ste.train.signals.StopRequest`
_StopRequest = StopRequest

__all__ = [
    "AMP_MODES", "AUTO", "NORM_TYPES", "OPTIMIZERS", "RESUME_METADATA_KEYS", "SCHEDULES", "STOP_SIGNALS",
    "StopRequest", "TrainConfig", "TrainResult", "TrainingDiverged", "build_optimizer", "build_scheduler",
    "evaluate", "lr_factor", "parameter_groups", "train",
]
