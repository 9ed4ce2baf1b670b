"""The DeepSeek-V2/V3 transformer: embedding, scanned dense and MoE layer stacks, head, MTP.

`x = x + MLA(RMSNorm(x)); x = x + FFN(RMSNorm(x))`, FFN a dense SwiGLU for the first
`first_k_dense_replace` layers and DeepSeekMoE after (SPEC section 2). Layers of one kind
are stacked on a leading "layers" axis and run with `nnx.scan`, so compile time does not grow
with depth.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.linear import Precision, as_precision, param
from dsv3_jax.layers.mla import MLA, LatentCache
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.layers.moe import MoE
from dsv3_jax.layers.mtp import MTP
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import rope_cos_sin
from sharding.mesh import platform as mesh_platform
from sharding.rules import constrain, variable_sharding

ACT = ("batch", "seq", None)  # logical layout of [batch, seq, embed] activations


class Block(nnx.Module):
    """Pre-norm attention + feed-forward block; FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, dispatcher=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.is_moe = moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MLA(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                param_dtype=param_dtype)
        self.mlp = (MoE(cfg, rngs=rngs, dispatcher=dispatcher, **kw) if moe else
                    MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs,
                        std=cfg.initializer_range, **kw))

    def __call__(self, x: Float[Array, "batch seq embed"], cos, sin,
                 segment_ids: Int[Array, "batch seq"] | None = None
                 ) -> tuple[Float[Array, "batch seq embed"], dict]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        return self.ffn(x)

    def ffn(self, x: Float[Array, "batch seq embed"]) -> tuple[Float[Array, "batch seq embed"], dict]:
        """The residual feed-forward half of the block, and the MoE aux stats."""
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux = self.mlp(h)
        else:
            y, aux = self.mlp(h), {}
        return x + y, aux

    def decode(self, x: Float[Array, "batch seq embed"], cos, sin, cache: LatentCache | None,
               start: Int[Array, "batch"], *, prefill: bool = False
               ) -> tuple[Float[Array, "batch seq embed"], LatentCache]:
        """The block over new tokens with attention over a latent cache; returns their entries.
        Absorbed attention (`MLA.decode`), or with `prefill` the expanded form (`MLA.prefill`)."""
        attend = self.self_attn.prefill if prefill else self.self_attn.decode
        a, entries = attend(self.input_layernorm(x), cos, sin, cache, start)
        x, _ = self.ffn(x + a)
        return x, entries


def _stack_blocks(cfg: ModelConfig, n: int, rngs: nnx.Rngs, **kw) -> Block:
    """`n` blocks stacked on a leading "layers" axis (created with nnx.vmap)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return Block(cfg, rngs=r, **kw)

    stack = make(rngs)
    for _, v in nnx.iter_graph(stack):
        if isinstance(v, nnx.Variable) and "logical_axes" in v.get_metadata():
            v.set_metadata(logical_axes=("layers",) + tuple(v.get_metadata()["logical_axes"]))
    return stack


# Set by the training step (`unrolled_for_training`): on CPU its layer loop is unrolled. XLA:CPU's
# loop copies residuals and each layer's gradients in and out of stacked buffers; unrolled, the
# 64-expert step of benchmarks/moe_speed.py is ~10% faster (tiny config: same compile time). A
# forward alone is slower unrolled on CPU, so inference keeps the loop, as do accelerators.
_UNROLL_FOR_TRAINING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "unroll_for_training", default=False)


@contextlib.contextmanager
def unrolled_for_training():
    """Trace the model for a training step: on CPU the layer loop is unrolled (see above)."""
    token = _UNROLL_FOR_TRAINING.set(True)
    try:
        yield
    finally:
        _UNROLL_FOR_TRAINING.reset(token)


def _run_stack(stack: Block, x, cos, sin, remat: bool, segment_ids=None):
    def body(carry, block):
        x, aux = block(carry, cos, sin, segment_ids)
        return constrain(x, ACT), aux

    if remat:
        body = nnx.remat(body)
    unroll = _UNROLL_FOR_TRAINING.get() and mesh_platform(jax.sharding.get_abstract_mesh()) == "cpu"
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=unroll)(x, stack)


def _decode_stack(stack: Block, x, cos, sin, cache: LatentCache | None, start, prefill: bool):
    """Scan the stacked blocks over (block, that layer's cache slice); stacks the new entries."""
    def body(x, block, layer_cache):
        x, entries = block.decode(x, cos, sin, layer_cache, start, prefill=prefill)
        return constrain(x, ACT), entries

    if cache is None:
        return nnx.scan(lambda x, block: body(x, block, None), in_axes=(nnx.Carry, 0),
                        out_axes=(nnx.Carry, 0))(x, stack)
    return nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(x, stack, cache)


@dataclasses.dataclass
class DecodeCache:
    """Latent caches of the dense stack, the MoE stack ([layers, batch, time, ...]) and MTP depth 1."""

    dense: LatentCache | None
    moe: LatentCache | None
    mtp: LatentCache | None = None


jax.tree_util.register_dataclass(DecodeCache, data_fields=["dense", "moe", "mtp"], meta_fields=[])


@dataclasses.dataclass
class ModelOutput:
    """Everything one forward pass computes.

    With `forward(..., logits=False)` (training: the loss applies the head chunk by chunk,
    dsv3_jax/train/losses.py) `logits` is None and `mtp_logits` empty; `hidden` and
    `mtp_hidden` are what the head reads."""

    logits: Float[Array, "batch seq vocab"] | None        # fp32
    hidden: Float[Array, "batch seq embed"]               # final hidden state after the final norm
    mtp_logits: tuple[Float[Array, "batch _ vocab"], ...]  # depth k: [batch, seq - k, vocab]
    expert_counts: Int[Array, "moe_layers experts"]       # routed rows per expert per MoE layer
    balance: Float[Array, "moe_layers"]                   # sequence-wise balance term per layer
    dropped: Int[Array, "moe_layers"]                     # rows dropped by a capacity limit (0: dropless)
    mtp_expert_counts: Int[Array, "depth experts"] | None = None
    mtp_hidden: tuple[Float[Array, "batch _ embed"], ...] = ()  # depth k: head input, [b, seq - k, D]
    mtp_balance: Float[Array, "depth"] | None = None     # each MTP depth's MoE balance term


jax.tree_util.register_dataclass(
    ModelOutput, data_fields=[f.name for f in dataclasses.fields(ModelOutput)], meta_fields=[])


class Transformer(nnx.Module):
    """DeepSeek-V2/V3 causal LM. `model(input_ids)` -> fp32 logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, dispatcher=None):
        self.cfg = cfg
        self.dtype = as_precision(dtype).dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, dispatcher=dispatcher)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = param(rngs, (V, D), ("vocab", "embed"), dtype=param_dtype,
                                  std=cfg.initializer_range)
        self.dense_layers = (_stack_blocks(cfg, cfg.num_dense_layers, rngs, moe=False, **kw)
                             if cfg.num_dense_layers else None)
        self.moe_layers = (_stack_blocks(cfg, cfg.num_moe_layers, rngs, moe=True, **kw)
                           if cfg.num_moe_layers else None)
        self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = param(rngs, (D, V), ("embed", "vocab"), dtype=param_dtype,
                             std=cfg.initializer_range)
        self.mtp = nnx.List([
            MTP(cfg, Block(cfg, moe=True, rngs=rngs, **kw), rngs=rngs, dtype=dtype,
                param_dtype=param_dtype)
            for _ in range(cfg.num_nextn_predict_layers)])

    def embed(self, input_ids: Int[Array, "batch seq"]) -> Float[Array, "batch seq embed"]:
        """Token embeddings in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def head(self, h: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq vocab"]:
        """Output head, logits in fp32."""
        return head_logits(h, self.lm_head[...], self.dtype)

    def forward(self, input_ids: Int[Array, "batch seq"], positions: Int[Array, "batch seq"] | None = None,
                *, segment_ids: Int[Array, "batch seq"] | None = None, mtp: bool = False,
                logits: bool = True) -> ModelOutput:
        """Full forward pass; with `mtp=True` also every MTP depth.

        `segment_ids`: packed documents (same id = same document, contiguous runs); a token
        attends only to earlier tokens of its own document, and `positions` default to ones
        that restart at 0 at each document start (`segment_positions`). `logits=False` skips
        the vocabulary projection (the training loss applies the head in chunks to `hidden`
        and `mtp_hidden`)."""
        check_token_ids(input_ids, self.cfg.vocab_size)
        positions = default_positions(input_ids.shape, positions, segment_ids)
        cos, sin = rope_cos_sin(self.cfg, positions)
        x = constrain(self.embed(input_ids), ACT)
        if self.dense_layers is not None:
            x, _ = _run_stack(self.dense_layers, x, cos, sin, self.remat, segment_ids)
        E = self.cfg.n_routed_experts
        aux = {"expert_counts": jnp.zeros((0, E), jnp.int32), "balance": jnp.zeros((0,), jnp.float32),
               "dropped": jnp.zeros((0,), jnp.int32)}
        if self.moe_layers is not None:
            x, aux = _run_stack(self.moe_layers, x, cos, sin, self.remat, segment_ids)
        hidden = self.norm(x)
        out = ModelOutput(logits=self.head(hidden) if logits else None, hidden=hidden,
                          mtp_logits=(), expert_counts=aux["expert_counts"],
                          balance=aux["balance"], dropped=aux["dropped"])
        if mtp and len(self.mtp):
            out.mtp_hidden, out.mtp_expert_counts, out.mtp_balance = self.mtp_forward(
                input_ids, hidden, cos, sin, segment_ids)
            if logits:
                out.mtp_logits = tuple(self.head(h) for h in out.mtp_hidden)
        return out

    def mtp_forward(self, input_ids, hidden, cos, sin, segment_ids=None, *, embed=None):
        """The normed state of each MTP depth k ([batch, seq - k, embed]; `head` of it predicts
        token i + k + 1), their expert counts and their MoE layers' sequence-wise balance terms
        (which join the balance loss). `embed`: how to embed the shifted ids (default
        `self.embed`)."""
        embed = embed or self.embed
        states, counts, balances = [], [], []
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            seg = None if segment_ids is None else segment_ids[:, :-k]
            h, h_normed, aux = module(h[:, :-1], embed(input_ids[:, k:]), cos[:, :-k], sin[:, :-k],
                                      seg)
            states.append(h_normed)
            counts.append(aux["expert_counts"])
            balances.append(aux.get("balance", jnp.zeros((), jnp.float32)))
        return tuple(states), jnp.stack(counts), jnp.stack(balances)

    def decode(self, input_ids: Int[Array, "batch seq"], positions: Int[Array, "batch seq"],
               cache: DecodeCache | None = None, *, prefill: bool = False
               ) -> tuple[Float[Array, "batch seq embed"], DecodeCache]:
        """Serving forward of new tokens over a latent cache: (normed hidden, their cache entries).

        Row b's tokens sit at consecutive positions from `positions[b, 0]`, and its cache holds
        valid entries for positions `[0, positions[b, 0])` (`cache=None`: nothing before them,
        e.g. a prefill). Logits are `head(hidden)`; the caller writes the returned entries
        ([layers, batch, seq, ...]) into its cache at `positions` (dsv3_jax/serve/cache.py).
        `prefill=True` runs attention in the expanded blockwise form (many new tokens; the
        cache, if any, must then reach at least to the last new position), else absorbed.
        """
        cos, sin = rope_cos_sin(self.cfg, positions)
        start = positions[:, 0]
        x = constrain(self.embed(input_ids), ACT)
        entries = {}
        for name, stack in (("dense", self.dense_layers), ("moe", self.moe_layers)):
            if stack is not None:
                layer_cache = None if cache is None else getattr(cache, name)
                x, entries[name] = _decode_stack(stack, x, cos, sin, layer_cache, start, prefill)
        return self.norm(x), DecodeCache(dense=entries.get("dense"), moe=entries.get("moe"))

    def mtp_decode(self, hidden: Float[Array, "batch seq embed"], next_ids: Int[Array, "batch seq"],
                   positions: Int[Array, "batch seq"], cache: LatentCache | None = None, *,
                   prefill: bool = False) -> tuple[Float[Array, "batch seq embed"], LatentCache]:
        """MTP depth 1 over a latent cache: from the main model's hidden at position i and the
        token at i + 1, the normed state whose `head` predicts token i + 2; and its cache entries."""
        cos, sin = rope_cos_sin(self.cfg, positions)
        _, normed, entries = self.mtp[0].decode(hidden, self.embed(next_ids), cos, sin, cache,
                                                positions[:, 0], prefill=prefill)
        return normed, entries

    def __call__(self, input_ids: Int[Array, "batch seq"],
                 positions: Int[Array, "batch seq"] | None = None) -> Float[Array, "batch seq vocab"]:
        """fp32 logits [batch, seq, vocab]."""
        return self.forward(input_ids, positions).logits


def head_logits(h: Float[Array, "batch seq embed"], lm_head: Float[Array, "embed vocab"], dtype
                ) -> Float[Array, "batch seq vocab"]:
    """The output head: operands in the compute dtype, fp32 accumulation and logits (the one
    definition `Transformer.head` and the chunked loss share)."""
    return jnp.einsum("bsd,dv->bsv", h.astype(dtype), lm_head.astype(dtype),
                      preferred_element_type=jnp.float32)


def segment_positions(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Positions that restart at 0 wherever the segment id changes (each packed document's
    first token is at position 0)."""
    b, s = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def default_positions(shape, positions=None, segment_ids=None) -> Int[Array, "batch seq"]:
    """`positions` if given, else restarting at each segment (`segment_positions`), else 0..seq-1."""
    if positions is not None:
        return positions
    if segment_ids is not None:
        return segment_positions(segment_ids)
    b, s = shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   remat: bool = False, mesh=None, capacity_factor: float | None = None
                   ) -> Transformer:
    """The model's structure with shape-only parameters (nothing allocated).

    `dtype` is a compute dtype or a `Precision` (e.g. `Precision.named("fp8")`). With a `mesh`,
    MoE layers get the expert-parallel dispatcher (sharding/expert_parallel.py).
    """
    dispatcher = None
    if mesh is not None:
        from sharding.expert_parallel import ExpertParallelDispatcher
        dispatcher = ExpertParallelDispatcher(mesh, capacity_factor=capacity_factor)
    elif capacity_factor is not None:
        raise ValueError("capacity_factor applies to expert-parallel dispatch: pass a mesh")
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                              param_dtype=param_dtype, remat=remat,
                                              dispatcher=dispatcher))


def place(value, var: nnx.Variable, mesh) -> jax.Array:
    """Put a host value on the devices, split by the variable's logical axes when `mesh` is set."""
    if mesh is None:
        return jnp.asarray(value, var.dtype)
    return jax.device_put(np.asarray(value, var.dtype), variable_sharding(var, mesh))


def init_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, mesh=None, capacity_factor: float | None = None,
               precision: str | None = None) -> Transformer:
    """A randomly initialised model, fast: shapes from `nnx.eval_shape`, values from NumPy.

    Same distributions as `Transformer(cfg, rngs=...)` (normal(0, std) weights, unit norm gains,
    zero routing bias) without compiling an XLA random op per parameter shape, which on CPU
    costs tens of seconds even for the tiny config. With a `mesh`, each parameter is drawn on
    the host and only its shards go to the devices (`sharding/rules.py`); values do not depend
    on the mesh. Weights of `DEVICE_DRAW_ELEMENTS` or more are drawn on the devices instead,
    shard by shard (`_device_normal`). `precision` ("fp32", "bf16", "fp8") overrides `dtype`;
    parameters stay in `param_dtype` (fp32 master weights by default).
    """
    if precision is not None:
        dtype = Precision.named(precision)
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh,
                           capacity_factor=capacity_factor)
    rng = np.random.default_rng(seed)
    variables = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]
    for index, var in enumerate(variables):
        meta = var.get_metadata()
        shape = var.shape
        if "init_std" in meta and math.prod(shape) >= DEVICE_DRAW_ELEMENTS:
            var.set_value(_device_normal(seed, index, var, float(meta["init_std"]), mesh))
            continue
        if "init_std" in meta:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(meta["init_std"])
        else:
            value = np.full(shape, meta.get("init_value", 0.0), np.float32)
        var.set_value(place(value, var, mesh))
    return model


# Weights at least this large are drawn on the devices, each device only its own shard (a
# `jax.random` draw with a sharded output), so that no host ever holds a whole one: the 671B
# model's routed-expert stacks are 870 GB each in fp32. Smaller ones come from NumPy, which
# needs no compile per shape. No config below tens of billions of parameters reaches this.
DEVICE_DRAW_ELEMENTS = 1 << 28


def _device_normal(seed: int, index: int, var: nnx.Variable, std: float, mesh) -> jax.Array:
    """normal(0, std) drawn where it lives; the values depend on (seed, index, shape) only, not
    on the mesh (threefry is partitionable; to the rounding of the normal transform)."""
    sharding = variable_sharding(var, mesh) if mesh is not None else None
    draw = jax.jit(lambda key: (jax.random.normal(key, var.shape, jnp.float32) * std).astype(var.dtype),
                   out_shardings=sharding)
    return draw(jax.random.fold_in(jax.random.key(seed), index))


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Raise on ids outside [0, vocab_size) when the ids are concrete (not under jit)."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    ids = np.asarray(input_ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
