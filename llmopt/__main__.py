"""`python -m llmopt` (what `accelerate launch -m llmopt ...` runs)."""

from llmopt.cli.main import main

main()
