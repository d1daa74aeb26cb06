"""lowbit: int8 and int4 quantization for JAX/Flax transformers."""

__version__ = "0.1.0"

from lowbit import quant  # noqa: E402,F401
