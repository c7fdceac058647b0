"""mlx_flash: run language models larger than memory, FFN neurons read from flash on demand."""

__version__ = "0.1.0"
