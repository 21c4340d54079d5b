"""The built-in recipes, registered explicitly: the composition root of `flora-train`.

Kept apart from `flora.train.recipe` (the contract every recipe implements), so the
recipes import the contract and nothing imports back.
"""

from __future__ import annotations

from flora.train.causal_lm import CausalLMRecipe
from flora.train.image_classification import ImageClassificationRecipe
from flora.train.recipe import RecipeRegistry
from flora.train.text_classification import TextClassificationRecipe


def default_recipes() -> RecipeRegistry:
    """A fresh registry holding the built-in recipes."""
    registry = RecipeRegistry()
    registry.register(CausalLMRecipe())
    registry.register(TextClassificationRecipe())
    registry.register(ImageClassificationRecipe())
    return registry
