"""``flora.train``: recipes, built-in datasets and the training loop behind ``flora-train``.

    flora-train image-classification --base efficientnet-lite0 --data builtin:mnist5k --out DIR

or from Python: ``flora.train.train("image-classification", base=..., data=..., out=...)``.
"""

from flora.train.api import train
from flora.train.errors import DataError, TrainError
from flora.train.options import RecipeDefaults, TrainOptions
from flora.train.recipe import Recipe, RecipeRegistry, TrainTask
from flora.train.recipes import default_recipes

__all__ = [
    "DataError",
    "Recipe",
    "RecipeDefaults",
    "RecipeRegistry",
    "TrainError",
    "TrainOptions",
    "TrainTask",
    "default_recipes",
    "train",
]
