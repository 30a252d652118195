"""YAML recipes: validated plans of quantize / distill / eval steps, run resumably, checked by gates."""

from llmopt.recipes.plan import Recipe, Step, load_recipe
from llmopt.recipes.runner import RunReport, run_recipe

__all__ = ["Recipe", "RunReport", "Step", "load_recipe", "run_recipe"]
