"""Fine-tuning methods on one API (``wpeft.methods.base.PEFTMethod``), one module per method.

Importing this package registers every built-in method in ``METHODS``.
"""

from wpeft.methods import adaptformer, bitfit, full, lora, ssf, tadp, vpt  # noqa: F401
from wpeft.methods.base import GROUPS, METHODS, MethodConfig, PEFTMethod, create_method, register

__all__ = ["GROUPS", "METHODS", "MethodConfig", "PEFTMethod", "create_method", "register"]
