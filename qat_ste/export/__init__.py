"""ONNX export of quantized models and its check against PyTorch.

    from qat_ste.export import export_onnx, check_onnx
    result = export_onnx(qmodel, "model.onnx", torch.randn(1, 3, 224, 224), weights="int8")
    report = check_onnx(qmodel, "model.onnx", images, labels)
    print(report.table())

Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript); importing this package does not.
"""

from .check import CheckReport, SiteCheck, WeightCheck, check_onnx
from .onnx_export import ExportResult, SiteInfo, WeightInfo, export_float_onnx, export_onnx, read_metadata

__all__ = [
    "CheckReport", "ExportResult", "SiteCheck", "SiteInfo", "WeightCheck", "WeightInfo", "check_onnx",
    "export_float_onnx", "export_onnx", "read_metadata",
]
