"""qat_ste: quantization-aware training of activation-quantized networks with straight-through estimators.

    import qat_ste
    qmodel = qat_ste.quantize(model, bits=4, ste="clipped_relu")
    qat_ste.calibrate(qmodel, batches)
    print(qat_ste.report(qmodel))
    qat_ste.export_onnx(qmodel, "model.onnx", example_input)
"""

from .config import QuantConfig
from .errors import QatSteError
from .export import CheckReport, ExportResult, check_onnx, export_onnx
from .quantize import (
    AlphaProjector,
    alpha_parameters,
    calibrate,
    check_steps,
    project_alphas,
    quant_modules,
    quantize,
    report,
)
from .quantizer.blend import WeightBlender
from .quantizer.module import QuantAct
from .quantizer.weight import (
    QuantWeightConv1d,
    QuantWeightConv2d,
    QuantWeightConv3d,
    QuantWeightLinear,
    QuantWeightModule,
    WeightQuantizer,
    mark_epoch,
    quant_weight_layers,
)
from .ste import STE, get_ste, list_stes, register_ste, unregister_ste

__version__ = "0.1.0"

__all__ = [
    "STE", "AlphaProjector", "CheckReport", "ExportResult", "QatSteError", "QuantAct", "QuantConfig",
    "QuantWeightConv1d", "QuantWeightConv2d", "QuantWeightConv3d", "QuantWeightLinear", "QuantWeightModule",
    "WeightBlender", "WeightQuantizer", "alpha_parameters", "calibrate", "check_onnx", "check_steps", "export_onnx",
    "get_ste", "list_stes", "mark_epoch", "project_alphas", "quant_modules", "quant_weight_layers", "quantize",
    "register_ste", "report", "unregister_ste",
]
