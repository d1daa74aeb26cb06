"""Quick int4 vs int8 ablation: the README's main job.

Command::

    lowbit ablate --config configs/shakespeare_quick.py --report docs/results/shakespeare_quick.md

Cost: 6 min 2 s on 2 CPU cores (measured 2026-11-27: 2000 training steps of
nanoGPT's baby GPT in 185 s, then 14 grid points and a per-layer sensitivity
pass). Expected: float validation loss 1.82 nats/char on the held-out plays
(2.62 bits/char); W8A16 within 0.001 of float; W4A16 per-channel +0.017,
group 32 +0.011, GPTQ +0.005; W3 +0.11 and W2 +1.1 (the cliff).
"""

from lowbit.ablation import AblationConfig


def get_config() -> AblationConfig:
  return AblationConfig(
      name="shakespeare_quick",
      grid=("w8a16", "w8a8", "w8a8-tensor", "w8a8-tensor-smoothquant", "w4a16-tensor",
            "w4a16-channel", "w4a16-g32", "w4a16-channel-mse", "w4a16-channel-gptq", "w4a8",
            "w4a16-channel-qat-lsq", "w3a16-channel", "w2a16-channel", "mixed"),
      eval_tokens=32768, qat_steps=100, sensitivity=True, sensitivity_eval_tokens=8192)
