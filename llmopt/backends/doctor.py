"""`llmopt backends doctor`: for every backend, which Python would run it, whether it imports there, and the
patches it needs on this machine — or the one-line reason it cannot run and what to install."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llmopt.errors import LlmoptError


@dataclass(slots=True)
class BackendStatus:
    name: str
    usable: bool
    library: str | None = None
    python: str | None = None
    origin: str | None = None
    patches: list[str] = field(default_factory=list)
    cpu: str = ""
    gpu: str = ""
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def doctor(probe: bool = True) -> list[BackendStatus]:
    """One status per backend (llmopt first). With probe, each library is imported in its own Python."""
    import sys

    import torch

    from llmopt import __version__
    from llmopt.backends import specs
    from llmopt.backends.base import find_interpreter, run_worker

    rows = [BackendStatus("llmopt", True, f"llmopt {__version__} (torch {torch.__version__})", sys.executable,
                          "llmopt env", cpu="rtn, int8, w8a8, gptq, awq → compressed-tensors/gptq/awq; int4/int8 "
                          "CPU kernels", gpu="same methods; CUDA int4/int8 kernels")]
    for spec in specs().values():
        row = BackendStatus(spec.name, False, cpu=spec.cpu, gpu=spec.gpu)
        try:
            interp = find_interpreter(spec)
            row.python, row.origin = interp.python, interp.origin
            if probe:
                res = run_worker(spec, interp, {"kind": "probe"}, timeout=600).result
                row.library, row.patches = res["library"], res["patches"]
                v = res.get("versions", {})
                row.library += f" (torch {v.get('torch')}, transformers {v.get('transformers')})"
            row.usable = True
        except LlmoptError as e:
            row.reason = str(e).removeprefix(f"backend {spec.name} is not usable: ")
        rows.append(row)
    return rows
