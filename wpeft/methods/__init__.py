"""Fine-tuning methods on one API (``wpeft.methods.base.PEFTMethod``), one module per method.

Importing this package registers every built-in method in ``METHODS``.
"""

from wpeft.methods import (  # noqa: F401  (registration)
    adaptformer,
    bitfit,
    full,
    lora,
    sfas,
    ssf,
    tadp,
    vpt,
    weatherpeft,
)
from wpeft.methods.base import GROUPS, METHODS, MethodConfig, PEFTMethod, create_method, register

__all__ = ["GROUPS", "METHODS", "MethodConfig", "PEFTMethod", "create_method", "register"]
