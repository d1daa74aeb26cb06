"""The full int4 vs int8 ablation on a char-level GPT (complete works of Shakespeare).

Command::

    lowbit ablate --config configs/shakespeare_char.py --report docs/results/shakespeare.md

For nanoGPT's number, train and validate on tiny-shakespeare instead::

    lowbit ablate --config configs/shakespeare_char.py --data ../shared/data/tinyshakespeare.txt \\
        --set data_sha256=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed

Cost: about 13 minutes on 2 CPU cores: 3 minutes of float training, then 9 min
47 s for the 31 grid points (four QAT fine-tunes of 200 steps and a float
fine-tune control), the sensitivity pass and the policy search (measured
2026-11-27 with --float-ckpt reusing the quick run's float model).
Expected: float validation loss 1.81 nats/char on the held-out plays
(tiny-shakespeare: 1.743, target <= 1.92, nanoGPT reaches 1.88); int8
weight-only within 0.001 of float; per-channel beats per-tensor; groups recover
part of the int4 loss (asymmetric g32 most among RTN); GPTQ best at 4 bits;
the 3-bit / 2-bit cliff.
"""

from lowbit.ablation import POINTS, AblationConfig


def get_config() -> AblationConfig:
  return AblationConfig(name="shakespeare_char", grid=tuple(POINTS), sensitivity=True)
