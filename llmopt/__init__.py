"""llmopt: make LLMs cheaper to run, and measure what each compression costs."""

__version__ = "0.1.0"
