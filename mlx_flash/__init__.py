"""mlx_flash: run language models larger than memory, FFN neurons read from flash on demand.

An implementation of "LLM in a flash: Efficient Large Language Model Inference with Limited
Memory" (Alizadeh et al., ACL 2024) on MLX and mlx-lm.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream_generate", "flash_stats", "MlxFlashError", "__version__"]

from .errors import MlxFlashError  # noqa: E402


def __getattr__(name: str):
    # The API pulls in MLX and mlx-lm: import it on first use, so that tools that need only
    # the format (the converter, the reader) start fast.
    if name in ("load", "generate", "stream_generate", "flash_stats"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlx_flash' has no attribute {name!r}")
