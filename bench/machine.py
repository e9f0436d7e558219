"""The machine and versions a bench result was measured with (every result file names them)."""

from __future__ import annotations

import os
import platform


def versions() -> dict:
    """Python, CPU count, and where installed vLLM, torch and the GPU's name."""
    out: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
        import vllm

        out.update(vllm=vllm.__version__, torch=torch.__version__)
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # informative only
        pass
    return out
