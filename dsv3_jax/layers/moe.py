"""DeepSeekMoE (SPEC section 5): shared experts plus fine-grained routed experts.

The gate chooses experts in fp32: V3 scores with a sigmoid and chooses on `score + bias`
(the auxiliary-loss-free bias, used for choice only), limited to the best `topk_group` groups
(group score = sum of its top-2); V2 scores with a softmax and chooses greedily (group score =
group max under `group_limited_greedy`). Routed experts run as a grouped matmul over the
(token, expert) rows; a dispatcher moves those rows to the experts and back, so expert
parallelism (sharding/expert_parallel.py) plugs in without touching this file. On one device,
decode-sized batches (fewer rows than experts) skip the grouping: each row gathers its own
expert's weights and runs batched matrix-vector products (`RoutedExperts.per_row`), the same
function with fewer, smaller ops.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import QuantizedWeight
from dsv3_jax.layers import grouped_matmul as gm
from dsv3_jax.layers.grouped_ffn import grouped_ffn
from dsv3_jax.layers import platform_gmm
from dsv3_jax.layers.linear import Precision, as_precision, param
from dsv3_jax.layers.mlp import MLP


class RoutingBias(nnx.Variable):
    """The e_score_correction_bias: fp32, no gradient, updated by the balancing rule."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """The gate's decision for T tokens."""

    experts: Int[Array, "tokens k"]
    weights: Float[Array, "tokens k"]   # fp32, already normalised / scaled
    scores: Float[Array, "tokens experts"]  # fp32 sigmoid or softmax scores (unbiased)


class Gate(nnx.Module):
    """Top-k expert choice, V3 (sigmoid, noaux_tc) or V2 (softmax, greedy)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        self.weight = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "router"),
                            dtype=param_dtype, std=cfg.initializer_range)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = RoutingBias(
                jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=("router",),
                init_value=0.0)

    def __call__(self, x: Float[Array, "tokens embed"]) -> Routing:
        cfg = self.cfg
        logits = jnp.dot(x.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        if cfg.scoring_func == "sigmoid":
            scores = jax.nn.sigmoid(logits)
        else:
            scores = jax.nn.softmax(logits, axis=-1)
        choice = scores
        if cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias[...]
        if cfg.n_group > 1 and cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
            t, e = choice.shape
            grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
            else:
                group_score = grouped.max(-1)
            top_groups = jax.lax.top_k(group_score, cfg.topk_group)[1]
            keep = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
            choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)
        experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        return Routing(experts=experts, weights=weights, scores=scores)


# Gathered weights of the per-row path, per projection: 8 MiB in fp32. Measured on CPU: past
# about this size the gathered copy falls out of cache and the grouped path wins even with no
# more rows than experts.
_PER_ROW_ELEMENTS = 1 << 21


class RoutedExperts(nnx.Module):
    """The E routed SwiGLU experts, stacked: run on a tiled, expert-grouped row buffer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.precision = as_precision(dtype)
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        std = cfg.initializer_range
        self.gate_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"),
                               dtype=param_dtype, std=std)
        self.up_proj = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"),
                             dtype=param_dtype, std=std)
        self.down_proj = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"),
                               dtype=param_dtype, std=std)

    @property
    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gate_proj, up_proj, down_proj), for dispatchers that run the experts themselves."""
        return self.gate_proj[...], self.up_proj[...], self.down_proj[...]

    def __call__(self, xs: Float[Array, "size embed"], layout: gm.GroupedLayout,
                 ) -> Float[Array, "size embed"]:
        """Each tile of rows through its own expert."""
        return expert_ffn(self.weights, xs, layout, self.precision)

    def per_row_fits(self, rows: int) -> bool:
        """Whether `rows` (token, expert) rows should run through `per_row` (static).

        Grouping shares an expert's weights between its rows; with no more rows than experts it
        shares almost nothing and its sort, scatter and padded tiles are pure overhead (at 4 rows
        on configs/tiny.json the grouped path takes 3x as long). The gathered weights are bounded
        by `_PER_ROW_ELEMENTS` per projection. FP8 experts keep the grouped path (its block-scaled
        products and their custom VJP)."""
        w = self.gate_proj.get_value()  # shape only (also on abstract models)
        if self.precision.fp8 or isinstance(w, QuantizedWeight):
            return False
        e, d, f = w.shape
        return rows <= e and rows * d * f <= _PER_ROW_ELEMENTS

    def per_row(self, xs: Float[Array, "rows embed"], experts: Int[Array, "rows"]
                ) -> Float[Array, "rows embed"]:
        """Each row through its own expert, the weights gathered per row (decode-sized batches)."""
        return per_row_expert_ffn(self.weights, xs, experts, self.precision)


def expert_ffn(weights, xs: Float[Array, "size embed"], layout: gm.GroupedLayout,
               precision: Precision, out_dtype=None) -> Float[Array, "size embed"]:
    """SwiGLU of each tile of rows with its own expert's (gate, up, down) weights; the output
    in `out_dtype` (default the compute dtype; fp32 for partial sums over a split FFN width).
    The grouped matmuls run on the compile target's kernel (dsv3_jax/layers/platform_gmm.py:
    the BLAS custom call on CPU, ours for FP8, the platform's grouped GEMM on TPU and GPU)."""
    w_gate, w_up, w_down = weights
    dtype = precision.dtype
    fp8, impl = _kernel(weights, precision)
    if impl == "ours" and not fp8:  # one loop over the tiles for the whole FFN
        return grouped_ffn(xs, w_gate, w_up, w_down, layout, dtype, out_dtype)

    def matmul(x, w, out=None):
        return platform_gmm.grouped_matmul(x, w, layout, dtype, out, impl, fp8=fp8)

    g, u = matmul(xs, w_gate), matmul(xs, w_up)
    return matmul(jax.nn.silu(g) * u, w_down, out_dtype)


def _kernel(weights, precision: Precision) -> tuple[bool, str]:
    """Whether the experts run in FP8, and the grouped-matmul kernel they run on."""
    fp8 = precision.fp8 or isinstance(weights[0], QuantizedWeight)
    return fp8, platform_gmm.current(fp8=fp8, dtype=precision.dtype)


def expert_layout(group_ids: Int[Array, "rows"], num_groups: int, weights, precision: Precision,
                  valid=None) -> gm.GroupedLayout:
    """The expert-grouped layout of routed rows, tiled as the experts' kernel wants it (exact
    rows for the CPU BLAS kernel, `gm.choose_tile` otherwise)."""
    tile = platform_gmm.layout_tile(_kernel(weights, precision)[1])
    return gm.make_layout(group_ids, num_groups, tile=tile, valid=valid)


def per_row_expert_ffn(weights, xs: Float[Array, "rows embed"], experts: Int[Array, "rows"],
                       precision: Precision) -> Float[Array, "rows embed"]:
    """SwiGLU of each row with its own expert's weights (`w[experts]`), the numerics of
    `expert_ffn`: operands in `precision.dtype`, fp32 accumulation, products back in the dtype."""
    dtype = precision.dtype

    def matmul(a, w):
        return jnp.einsum("rk,rkn->rn", a, w[experts].astype(dtype),
                          preferred_element_type=jnp.float32).astype(dtype)

    w_gate, w_up, w_down = weights
    xs = xs.astype(dtype)
    return matmul(jax.nn.silu(matmul(xs, w_gate)) * matmul(xs, w_up), w_down)


class Dispatcher(Protocol):
    """Moves (token, expert) rows to the experts and the results back."""

    def __call__(self, x: Float[Array, "tokens embed"], experts: Int[Array, "tokens k"],
                 routed: RoutedExperts, num_experts: int
                 ) -> tuple[Float[Array, "tokens k embed"], Int[Array, "experts"], Int[Array, ""]]:
        """Each row's expert output (zero if dropped), global per-expert row counts, rows dropped."""
        ...


@dataclasses.dataclass(frozen=True)
class LocalDispatcher:
    """All experts on this device: group the rows by expert, run, read them back (or, for
    decode-sized batches, run each row with its own expert's gathered weights)."""

    per_row: bool = True  # False: always group (the reference the per-row path is tested against)

    def __call__(self, x, experts, routed, num_experts):
        t, k = experts.shape
        flat = experts.reshape(-1)
        rows = jnp.repeat(x, k, axis=0)  # row r is token r // k
        if self.per_row and routed.per_row_fits(t * k):
            y = routed.per_row(rows, flat)
            counts = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
        else:
            layout = expert_layout(flat, num_experts, routed.weights, routed.precision)
            y = gm.gather_rows(routed(gm.scatter_rows(rows, layout), layout), layout)
            counts = layout.group_sizes
        return y.reshape(t, k, x.shape[-1]), counts, jnp.zeros((), jnp.int32)


class MoE(nnx.Module):
    """Shared MLP plus the weighted sum of the chosen routed experts (fp32 combine)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, dispatcher: Dispatcher | None = None):
        self.cfg = cfg
        self.dtype = as_precision(dtype).dtype
        self.gate = Gate(cfg, rngs=rngs, param_dtype=param_dtype)
        self.experts = RoutedExperts(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs,
                dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range)
            if cfg.n_shared_experts else None)
        self.dispatcher = dispatcher or LocalDispatcher()

    def __call__(self, x: Float[Array, "batch seq embed"]) -> tuple[Float[Array, "batch seq embed"], dict]:
        """MoE output and aux stats: per-expert token counts and the sequence balance term."""
        b, s, d = x.shape
        xt = x.reshape(b * s, d)
        routing = self.gate(xt)
        y, counts, dropped = self.dispatcher(xt, routing.experts, self.experts,
                                             self.cfg.n_routed_experts)
        out = jnp.einsum("tk,tkd->td", routing.weights, y.astype(jnp.float32))
        if self.shared_experts is not None:
            out = out + self.shared_experts(xt).astype(jnp.float32)
        aux = {"expert_counts": counts, "dropped": dropped,
               "balance": sequence_balance(routing, b, s, self.cfg.n_routed_experts)}
        return out.astype(self.dtype).reshape(b, s, d), aux


def sequence_balance(routing: Routing, batch: int, seq: int, num_experts: int) -> Float[Array, ""]:
    """Complementary sequence-wise balance term `sum_i f_i * P_i`, averaged over sequences.

    f_i = E / (K * T) * (tokens of the sequence routed to i); P_i = mean over the sequence of
    the per-token normalised scores s_i / sum_j s_j (SPEC section 6).
    """
    k = routing.experts.shape[-1]
    seq_of_token = jnp.arange(batch * seq) // seq
    counts = jnp.zeros((batch, num_experts), jnp.float32).at[
        seq_of_token[:, None], routing.experts].add(1.0)
    f = counts * (num_experts / (k * seq))
    p = routing.scores / routing.scores.sum(-1, keepdims=True)
    p = p.reshape(batch, seq, num_experts).mean(1)
    return jnp.mean(jnp.sum(f * p, axis=-1))
