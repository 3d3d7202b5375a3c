"""Small helpers shared by the attention kernels: backend choice, dtype set, mask value."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative score for masked keys: exp() of it underflows to 0 without the
# inf - inf = NaN that -inf would give when a whole row is masked.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> compiled (Triton) kernel on GPU, the Pallas interpreter everywhere else."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)
