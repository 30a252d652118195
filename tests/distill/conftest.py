"""A small local training text: tokenizing the whole builtin train split per run would dominate test time."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def distill_text(tmp_path_factory) -> Path:
    from llmopt.calibration import DataSpec, load_texts

    path = tmp_path_factory.mktemp("distill-data") / "train.txt"
    path.write_text("\n\n".join(load_texts(DataSpec("builtin"), "train")[:400]))
    return path
