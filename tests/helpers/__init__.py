"""Shared test helpers: tiny model builders, an independent RTN, fake recipe steps (import as tests.helpers.X)."""
