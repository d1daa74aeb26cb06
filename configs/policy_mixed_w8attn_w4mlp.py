"""A precision policy written as a Python config: int8 attention, int4 g128 MLP.

Load it with ``lowbit.policy.load("configs/policy_mixed_w8attn_w4mlp.py")``.
"""

import jax.numpy as jnp

from lowbit.policy import PrecisionPolicy, PrecisionRule
from lowbit.quant import QuantSpec


def get_policy() -> PrecisionPolicy:
  return PrecisionPolicy((
      PrecisionRule("embed|lm_head", keep_float=True),
      PrecisionRule(r"layers/\d+/attn/.*", QuantSpec(bits=8, channel_axes=(1,)),
                    QuantSpec(bits=8, channel_axes=(0,))),
      PrecisionRule(r"layers/\d+/mlp/.*", QuantSpec(bits=4, channel_axes=(1,), group_size=128,
                                                   pack=True, scale_dtype=jnp.bfloat16)),
  ), allow_unused=True)
