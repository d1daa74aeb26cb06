"""Functional quantizers: pure JAX array functions, no Flax.

>>> import jax, jax.numpy as jnp
>>> from lowbit.quant import QuantSpec, quantize, dequantize
>>> w = jax.random.normal(jax.random.key(0), (256, 128))
>>> spec = QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
...                  scale_dtype=jnp.bfloat16)
>>> qw = quantize(w, spec)
>>> qw.qvalue.dtype, qw.qvalue.shape, qw.scale.shape
(dtype('uint8'), (128, 128), (2, 128))
>>> round(qw.bytes_per_element, 4)
0.5156
>>> bool(jnp.abs(dequantize(qw) - w).max() <= qw.scale.astype(jnp.float32).max() / 2 + 1e-6)
True

Integer group scales under a per-channel scale (``group_scales="int"``, the format whose
W4A8 kernels sum all of K in int32): ``x ~= (q * s) * c``, ``s`` int8 in ``[1, 16]``.

>>> qi = quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
...                            group_scales="int"))
>>> qi.scale.dtype, qi.scale.shape, qi.channel_scale.shape
(dtype('int8'), (2, 128), (1, 128))
>>> int(qi.scale.min()) >= 1 and int(qi.scale.max()) == INT_GROUP_SCALE_MAX
True
"""

from lowbit.quant.fake_quant import (
                                     LearnedClip,
                                     fake_quant,
                                     init_learned_clip,
                                     init_learned_scale,
                                     learned_clip_params,
                                     lsq_grad_scale,
                                     round_ste,
)
from lowbit.quant.packing import pack_int4, unpack_int4, unpack_int4_halves
from lowbit.quant.qarray import QArray
from lowbit.quant.quantize import (
    QuantParams,
    calibrate,
    code_zero_point,
    dequantize,
    effective_scale,
    quantization_error,
    quantize,
)
from lowbit.quant.spec import INT_GROUP_SCALE_MAX, Layout, QuantSpec

__all__ = [
    "INT_GROUP_SCALE_MAX", "Layout", "LearnedClip", "QArray", "QuantParams", "QuantSpec",
    "calibrate", "code_zero_point", "dequantize", "effective_scale", "fake_quant",
    "init_learned_clip", "init_learned_scale", "learned_clip_params", "lsq_grad_scale",
    "pack_int4", "quantization_error", "quantize", "round_ste", "unpack_int4",
    "unpack_int4_halves",
]
