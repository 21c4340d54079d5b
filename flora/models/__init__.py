"""The model zoo: embedded pretrained bases and local Hugging Face directories.

``load(name_or_path)`` returns a :class:`LoadedModel` (module, preprocessor, task kind,
base fingerprint, labels, context length, weights path). Embedded models are converted
once into ``$FLORA_HOME`` (default ``~/.cache/flora``) by ``prepare(name)`` or
``python -m flora.models prepare NAME``. See docs/models.md.
"""

from flora.models.catalog import embedded_models
from flora.models.efficientnet import EfficientNetLite0
from flora.models.errors import (
    ModelError,
    ModelPackageMissingError,
    UnknownModelError,
    UnsupportedModelError,
)
from flora.models.image_transform import ImageTransform
from flora.models.registry import EmbeddedModel, KindRule, LoadRequest, ModelRegistry
from flora.models.storage import home
from flora.models.text_encoder import encode, mean_pool, pool
from flora.models.types import MODEL_KINDS, LoadedModel, ModelKind, Pooling
from flora.models.weights import (
    StoredLayout,
    canonical_state_dict,
    read_safetensors,
    stored_layout,
)
from flora.models.zoo import load, prepare

__all__ = [
    "MODEL_KINDS",
    "EfficientNetLite0",
    "EmbeddedModel",
    "ImageTransform",
    "KindRule",
    "LoadRequest",
    "LoadedModel",
    "ModelError",
    "ModelKind",
    "ModelPackageMissingError",
    "ModelRegistry",
    "Pooling",
    "StoredLayout",
    "UnknownModelError",
    "UnsupportedModelError",
    "canonical_state_dict",
    "embedded_models",
    "encode",
    "home",
    "load",
    "mean_pool",
    "pool",
    "prepare",
    "read_safetensors",
    "stored_layout",
]
