"""qat_ste: quantization-aware training of activation-quantized networks with straight-through estimators."""

from .errors import QatSteError
from .ste import STE, get_ste, list_stes, register_ste, unregister_ste

__version__ = "0.1.0"

__all__ = ["QatSteError", "STE", "get_ste", "list_stes", "register_ste", "unregister_ste"]
