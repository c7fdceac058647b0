"""mlx_flash: run language models larger than memory, FFN neurons read from flash on demand.

An implementation of "LLM in a flash: Efficient Large Language Model Inference with Limited
Memory" (Alizadeh et al., ACL 2024) on MLX and mlx-lm.
"""

__version__ = "0.1.0"

from .api import flash_stats, generate, load, stream_generate  # noqa: E402
from .errors import MlxFlashError  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "flash_stats", "MlxFlashError", "__version__"]
