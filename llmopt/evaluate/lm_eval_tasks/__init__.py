"""lm-eval task definitions that ship with llmopt and run offline (read with lm-eval's TaskManager)."""
