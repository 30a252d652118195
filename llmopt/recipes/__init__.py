"""YAML recipes: validated plans of quantize / distill / eval steps, run resumably, checked by gates."""

from llmopt.recipes.execute import RunReport, run_recipe
from llmopt.recipes.plan import PlannedStep, Recipe, load_recipe

__all__ = ["PlannedStep", "Recipe", "RunReport", "load_recipe", "run_recipe"]
