"""Multi-adapter inference: per-row batched and merged FLoRA adapters over one base model.

``ServingModel`` wraps a base model's modules lazily with served wrappers holding device
slot banks; ``set_routing`` says which slot each batch row uses, or each token segment of
a packed forward (``Segments``, SGMV); ``merge``/``unmerge``
fold one adapter into the weights (exactly restorable). ``flora.serving.reference`` is the
plain per-row implementation the fast paths are tested against.
"""

from flora.serving.bank import DeviceSlotBank
from flora.serving.base import NO_SLOT, RoutingState, ServedModule, ServingPolicy
from flora.serving.conv import ServedConv
from flora.serving.embedding import ServedEmbedding
from flora.serving.factors import ModuleFactors, fold_two_mode, modules_from_adapter
from flora.serving.linear import ServedLinear
from flora.serving.model import ServingModel, register_wrapper
from flora.serving.reference import reference_delta, reference_forward
from flora.serving.segments import Segments, segment_delta

__all__ = [
    "NO_SLOT",
    "DeviceSlotBank",
    "ModuleFactors",
    "RoutingState",
    "Segments",
    "ServedConv",
    "ServedEmbedding",
    "ServedLinear",
    "ServedModule",
    "ServingModel",
    "ServingPolicy",
    "fold_two_mode",
    "modules_from_adapter",
    "reference_delta",
    "reference_forward",
    "register_wrapper",
    "segment_delta",
]
