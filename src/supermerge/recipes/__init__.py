"""YAML recipes (mergekit's format where it overlaps) and the Python merge API."""

from supermerge.recipes.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]
