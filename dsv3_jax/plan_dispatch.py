"""The planner's expert-parallel dispatch (dsv3_jax/plan.py): the rows one device receives per
MoE layer, and the bytes of that layer's row buffers held at once.

R = X * cap rows per device, cap = tokens * min(k, E / X) (dropless) or
ceil(cf * tokens * k / X) (capacity factor cf); tokens * k without an expert axis. The layer's
working set is `DISPATCH_BUFFERS` row buffers of D values (send, receive, grouped, returned,
and their gradients) and `FFN_BUFFERS` of F / T values (gate, up, their product and
gradients), in the compute itemsize c. On XLA:CPU (the platform `python -m dsv3_jax.aot
--target cpu` tells the planner) the counts are those live at the peak of its V2-Lite step
(`pipeline=2,expert=32`, buffer live ranges of `--dump`), per kernel (`BUFFERS_ON_CPU`): 6 and
4 on our tile loop (gate and up recomputed, their gradients), 7 and 1 on the BLAS grouped GEMM
(dsv3_jax/layers/cpu_gmm.py: the products are custom calls, nothing of the FFN kept between
them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv3_jax.plan import Setup

DISPATCH_BUFFERS = 6
FFN_BUFFERS = 6
BUFFERS_ON_CPU = {"ours": (6, 4), "blas": (7, 1)}  # (dispatch, FFN) row buffers per kernel


def dispatch_rows(setup: Setup, tokens: float) -> int:
    """R: rows one device receives from the expert-parallel all-to-all for `tokens` tokens."""
    cfg, X = setup.config, setup.sizes["expert"]
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    if X == 1:
        return int(tokens * k)
    if setup.capacity_factor is None:
        return int(X * tokens * min(k, E // X))
    return int(X * max(1, min(tokens * min(k, E // X), math.ceil(setup.capacity_factor * tokens * k / X))))


def row_buffers(setup: Setup, platform: str | None) -> tuple[int, int]:
    """(dispatch, FFN) row buffers of one MoE layer's working set: XLA:CPU's per kernel, else
    the accelerators'."""
    if platform != "cpu":
        return DISPATCH_BUFFERS, FFN_BUFFERS
    from dsv3_jax.layers import platform_gmm
    kernel = platform_gmm.choose("cpu", fp8=setup.precision == "fp8", dtype=setup.compute.dtype)
    return BUFFERS_ON_CPU.get(kernel, (DISPATCH_BUFFERS, FFN_BUFFERS))


def dispatch_bytes(setup: Setup, rows: int, c: int, buffers: tuple[int, int]) -> float:
    """The row buffers of one MoE layer for `rows` received rows, in itemsize `c`."""
    cfg, T = setup.config, setup.sizes["tensor"]
    return rows * (buffers[0] * cfg.hidden_size + buffers[1] * cfg.moe_intermediate_size / T) * c
