"""lowbit: int8 and int4 quantization for JAX/Flax transformers.

* :mod:`lowbit.quant`: pure-JAX quantizers (no Flax);
* :mod:`lowbit.kernels`: Pallas int8 / int4 matmuls and their dispatch;
* :mod:`lowbit.policy`: per-layer precision rules;
* :mod:`lowbit.nn`: NNX layers, the transformer, ``quantize_model`` and ``convert``.
"""

__version__ = "0.1.0"

from lowbit import policy, quant  # noqa: E402
from lowbit.nn import Transformer, TransformerConfig, convert, quantize_model  # noqa: E402
from lowbit.policy import PrecisionPolicy, PrecisionRule  # noqa: E402

__all__ = ["PrecisionPolicy", "PrecisionRule", "Transformer", "TransformerConfig", "convert",
           "policy", "quant", "quantize_model"]
