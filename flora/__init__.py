"""flora: N-dimensional Tucker (FLoRA) adapters for PyTorch models.

    dW = s * G x_1 U_1 ... x_N U_N,   W' = W + dW

for Linear, Conv1d/2d/3d (any groups), Embedding and transformers' Conv1D.
"""

from flora.adapter import Adapter, apply_adapter, load_adapter, remove_adapter, save_adapter
from flora.config import FloraConfig
from flora.errors import AdapterError, NonFiniteError
from flora.fingerprint import ModuleKind, ModuleSpec, base_fingerprint, describe_base
from flora.injection import adapter_layers, eject, get_config, inject, merge, set_enabled, unmerge
from flora.layers import FloraLayer

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterError",
    "FloraConfig",
    "FloraLayer",
    "ModuleKind",
    "ModuleSpec",
    "NonFiniteError",
    "__version__",
    "adapter_layers",
    "apply_adapter",
    "base_fingerprint",
    "describe_base",
    "eject",
    "get_config",
    "inject",
    "load_adapter",
    "merge",
    "remove_adapter",
    "save_adapter",
    "set_enabled",
    "unmerge",
]
