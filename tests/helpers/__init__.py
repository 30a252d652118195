"""Shared test helpers: tiny model builders, the test-sized builtin recipe, an independent RTN, fake recipe steps
(import as tests.helpers.X)."""
