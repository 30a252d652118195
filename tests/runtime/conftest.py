"""The runtime tests build QuantizedWeights with the formats tests' independent RTN helper."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant" / "formats"))
