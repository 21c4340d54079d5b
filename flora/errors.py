"""Typed errors for adapter files.

Every way an adapter file (or an adapter/base pairing) can be wrong has its own class, all
under :class:`AdapterError`, which subclasses :class:`ValueError` so callers that only know
"bad input" still catch it. The server maps ``error_type`` to the JSON error body and a 4xx
status; messages name the tensor or module at fault and never echo raw bytes.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class: the adapter is invalid or does not fit the base it is applied to."""

    error_type: str = "adapter_error"


class AdapterFormatError(AdapterError):
    """Not a safetensors file: truncated, corrupt header, a pickle under a new name, bad JSON."""

    error_type = "adapter_format_error"


class HeaderTooLargeError(AdapterFormatError):
    """The safetensors header length (first 8 bytes, little-endian) exceeds the cap."""

    error_type = "header_too_large"


class AdapterConfigError(AdapterError):
    """adapter_config.json is not allowed: unknown/missing field, wrong version or method,
    code references such as ``auto_map``, or a value of the wrong type."""

    error_type = "adapter_config_error"


class UnknownTensorError(AdapterError):
    """The weights hold a key that the config does not explain."""

    error_type = "unknown_tensor"


class MissingTensorError(AdapterError):
    """The config announces a tensor that the weights do not hold."""

    error_type = "missing_tensor"


class TensorShapeError(AdapterError):
    """A tensor's shape does not follow from the module's weight shape and ranks."""

    error_type = "tensor_shape_error"


class TensorDtypeError(AdapterError):
    """A tensor's dtype is not float16, bfloat16 or float32."""

    error_type = "tensor_dtype_error"


class NonFiniteError(AdapterError):
    """A tensor holds NaN or +-Inf (also raised by merge when a result is not finite)."""

    error_type = "non_finite"


class RankLimitError(AdapterError):
    """A rank is below 1, above the configured limit, or above its mode's size."""

    error_type = "rank_limit"


class BaseMismatchError(AdapterError):
    """The adapter was made for another base: fingerprint or module table differs."""

    error_type = "base_mismatch"


class UnknownModuleError(AdapterError):
    """The adapter targets a module the base lacks, or one of another kind or shape."""

    error_type = "unknown_module"


__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AdapterFormatError",
    "BaseMismatchError",
    "HeaderTooLargeError",
    "MissingTensorError",
    "NonFiniteError",
    "RankLimitError",
    "TensorDtypeError",
    "TensorShapeError",
    "UnknownModuleError",
    "UnknownTensorError",
]
