"""Pipeline parallelism: the MoE layer stack split into stages over the mesh's pipeline axis.

GPipe schedule inside a `jax.shard_map` that is manual over the pipeline axis only (the data,
fsdp, expert and tensor axes stay automatic, so each stage is an ordinary sharded program and
its MoE layers run the expert-parallel all-to-all of sharding/expert_parallel.py among the
stage's own devices). A step's batch is cut into M micro-batches; at tick t stage s runs its
layers on micro-batch t - s and hands the result to stage s + 1 with `jax.lax.ppermute`.
M + P - 1 ticks move every micro-batch through the P stages; the backward pass is the same
schedule reversed (autodiff of the scan and of `ppermute`). Idle slots (the bubble) compute
on zeros and are masked, as real hardware would sit idle for them: bubble fraction
(P - 1) / (M + P - 1).

What runs where (`StagePlan`):
- the MoE stack's last `P * (n_moe // P)` layers: `n_moe // P` consecutive layers per stage,
  their parameters split over the pipeline axis (the "layers" -> "pipeline" rule);
- before the pipeline, split over ALL devices (the pipeline axis joins the batch axes): the
  embedding, every dense layer and the first `n_moe % P` MoE layers, i.e. layers that do not
  fill a whole round of stages. No identity padding: nothing is computed twice or for nothing,
  and these layers have no bubble. Cost: their parameters are not split over stages (V3 on 8
  stages: 3 dense + 2 MoE of 61 layers), and a stack whose length P does not divide is stored
  unsplit over the pipeline axis (the rules fall back to replication), so its pipelined
  layers reach their stage by a local slice;
- after the pipeline, also over all devices: the final norm, the head and the MTP module.
  Spreading them over the P x (data, fsdp, expert) devices costs 1/P of putting them on the
  last stage, which would add their time to every tick or serialise them after the loop.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from dsv3_jax.layers.rope import rope_cos_sin
from dsv3_jax.model import ACT, ModelOutput, Transformer, check_token_ids
from sharding.expert_parallel import ExpertParallelDispatcher
from sharding.rules import RULES, constrain, use_rules

AXIS = "pipeline"
# inside a stage the pipeline axis is manual: the batch is split over the other batch axes only
STAGE_RULES = dict(RULES, batch=tuple(a for a in RULES["batch"] if a != AXIS))


class PipelineError(ValueError):
    """A pipeline layout that cannot run (too few layers, micro-batches that do not fit)."""


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Which layers run before the pipeline and how many each stage holds."""

    stages: int
    microbatches: int
    dense_before: int          # dense layers, all run before the pipeline
    moe_before: int            # MoE layers [0, moe_before) run before the pipeline
    moe_per_stage: int         # stage s holds MoE layers moe_before + s * moe_per_stage + [0, n)

    @property
    def bubble(self) -> float:
        """GPipe's idle fraction of each stage's ticks: (P - 1) / (M + P - 1)."""
        return (self.stages - 1) / (self.microbatches + self.stages - 1)

    def describe(self) -> str:
        before = f"{self.dense_before} dense + {self.moe_before} MoE" if self.moe_before else \
            f"{self.dense_before} dense"
        return (f"pipeline: {self.stages} stages x {self.moe_per_stage} MoE layers ({before} "
                f"layers before it, on all devices), {self.microbatches} micro-batches, GPipe "
                f"bubble (P-1)/(M+P-1) = {self.bubble:.1%}")


def pipeline_stages() -> int:
    """The context mesh's pipeline axis size (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(AXIS, 1)


def plan_stages(cfg, stages: int, microbatches: int) -> StagePlan:
    """The stage assignment for `stages` pipeline stages (see the module docstring)."""
    if microbatches < 1:
        raise PipelineError(f"microbatches must be >= 1, got {microbatches}")
    n_moe = cfg.num_moe_layers
    if n_moe < stages:
        raise PipelineError(
            f"the pipeline axis has {stages} stages but the model has only {n_moe} MoE layers "
            f"(of {cfg.num_hidden_layers}; the {cfg.num_dense_layers} dense layers run before "
            f"the pipeline): use at most {n_moe} stages")
    return StagePlan(stages=stages, microbatches=microbatches, dense_before=cfg.num_dense_layers,
                     moe_before=n_moe % stages, moe_per_stage=n_moe // stages)


def pipeline_forward(model: Transformer, input_ids: Int[Array, "batch seq"],
                     positions: Int[Array, "batch seq"] | None = None, *, microbatches: int,
                     mtp: bool = False) -> ModelOutput:
    """`model.forward` with the MoE layers pipelined over the context mesh's pipeline axis.

    Call under `jax.set_mesh(mesh)` (and `jit`). Same outputs as `model.forward`, including the
    per-layer expert counts, balance terms and dropped rows in layer order.
    """
    if pipeline_stages() < 2:
        raise PipelineError("pipeline_forward needs a mesh with pipeline > 1 (jax.set_mesh)")
    cfg = model.cfg
    mesh = jax.sharding.get_abstract_mesh()
    plan = plan_stages(cfg, mesh.shape[AXIS], microbatches)
    check_token_ids(input_ids, cfg.vocab_size)
    b, s = input_ids.shape
    check_microbatches(b, plan, mesh)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = rope_cos_sin(cfg, positions)
    x = constrain(model.embed(input_ids), ACT)
    if model.dense_layers is not None:
        x, _ = _run_layers(*_split(model.dense_layers), x, cos, sin, model.remat)
    gd, leaves, treedef = _split(model.moe_layers)
    r = plan.moe_before
    aux_before = None
    if r:
        x, aux_before = _run_layers(gd, [v[:r] for v in leaves], treedef, x, cos, sin, model.remat)
    x, aux = _pipeline(gd, [v[r:] for v in leaves], treedef, x, cos, sin, plan, model.remat)
    if aux_before is not None:
        aux = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), aux_before, aux)
    hidden = model.norm(x)
    out = ModelOutput(logits=model.head(hidden), hidden=hidden, mtp_logits=(),
                      expert_counts=aux["expert_counts"], balance=aux["balance"],
                      dropped=aux["dropped"])
    if mtp and len(model.mtp):
        out.mtp_logits, out.mtp_expert_counts = model.mtp_forward(input_ids, hidden, cos, sin)
    return out


def check_microbatches(batch: int, plan: StagePlan, mesh) -> None:
    """Raise unless `batch` splits into the plan's micro-batches and those over a stage's devices."""
    m = plan.microbatches
    if batch % m:
        raise PipelineError(f"the batch of {batch} sequences is not divisible by --microbatches {m}")
    axes = [a for a in STAGE_RULES["batch"] if mesh.shape.get(a, 1) > 1]
    n = math.prod(mesh.shape[a] for a in axes)
    if (batch // m) % n:
        raise PipelineError(
            f"a micro-batch of {batch // m} sequences (batch {batch} / --microbatches {m}) is not "
            f"divisible by {n}, the product of the mesh axes {'x'.join(axes)} that split it "
            "inside a stage")


def _split(stack):
    """(graphdef, state leaves with a leading layers axis, state treedef) of a layer stack."""
    graphdef, state = nnx.split(stack)
    leaves, treedef = jax.tree.flatten(state)
    return graphdef, leaves, treedef


def _run_layers(graphdef, leaves, treedef, x, cos, sin, remat: bool, dispatcher=None):
    """Scan the stacked blocks over x; aux stats stacked per layer (like the model's stacks)."""
    def layer(x, layer_leaves):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
        if dispatcher is not None and block.is_moe:
            block.mlp.dispatcher = dispatcher
        x, aux = block(x, cos, sin)
        return constrain(x, ACT), aux

    if remat:
        layer = jax.checkpoint(layer)
    return jax.lax.scan(layer, x, leaves)


def _stage_dispatcher(graphdef, leaves, treedef):
    """The stacks' expert-parallel dispatcher, re-pointed at the mesh seen inside a stage
    (pipeline manual): shard_map requires the context mesh there."""
    block = nnx.merge(graphdef, jax.tree.unflatten(treedef, [v[0] for v in leaves]))
    d = block.mlp.dispatcher if block.is_moe else None
    if not isinstance(d, ExpertParallelDispatcher):
        return None
    return dataclasses.replace(d, mesh=jax.sharding.get_abstract_mesh(),
                               collective="ragged" if d._ragged() else "dense")


def _pipeline(graphdef, leaves, treedef, x, cos, sin, plan: StagePlan, remat: bool):
    """GPipe over the pipeline axis: [batch, seq, embed] through `plan.stages` stages."""
    n_stages, m = plan.stages, plan.microbatches
    b = x.shape[0]

    mb = b // m
    scatter = mb % n_stages == 0

    # Micro-batch i holds rows i, i + m, i + 2m, ...: a device's contiguous slice of the batch
    # holds a contiguous slice of every micro-batch, so the split moves no data.
    def micro(a):
        return a.reshape(mb, m, *a.shape[1:]).swapaxes(0, 1)

    def unmicro(a):
        return a.swapaxes(0, 1).reshape(b, *a.shape[2:])

    def stage_program(leaves, xs, cos, sin):
        stage = jax.lax.axis_index(AXIS)
        dispatcher = _stage_dispatcher(graphdef, leaves, treedef)

        def tick(carry, t):
            i = t - stage                     # the micro-batch this stage works on
            valid = (i >= 0) & (i < m)
            i = jnp.clip(i, 0, m - 1)
            h = jnp.where(stage == 0, xs[i], carry)
            y, aux = _run_layers(graphdef, leaves, treedef, h, cos[i], sin[i], remat, dispatcher)
            aux = {"expert_counts": jnp.where(valid, aux["expert_counts"], 0),
                   "balance": jnp.where(valid, aux["balance"], 0.0),
                   "dropped": jnp.where(valid, aux["dropped"], 0)}
            nxt = jax.lax.ppermute(y, AXIS, [(j, j + 1) for j in range(n_stages - 1)])
            return nxt, (y, aux)

        init = jnp.zeros_like(xs[0])
        _, (ys, aux) = jax.lax.scan(tick, init, jnp.arange(m + n_stages - 1))
        aux = {"expert_counts": aux["expert_counts"].sum(0), "dropped": aux["dropped"].sum(0),
               "balance": aux["balance"].sum(0) / m}  # balance: mean over sequences
        # the last stage's ys from tick P - 1 on are the outputs; hand every stage its share
        # of the batch (reduce-scatter over the micro-batch rows) or, when the rows do not
        # split over the stages, all of it (all-reduce)
        ys = jnp.where(stage == n_stages - 1, ys[n_stages - 1:], 0)
        if scatter:
            return jax.lax.psum_scatter(ys, AXIS, scatter_dimension=1, tiled=True), aux
        return jax.lax.psum(ys, AXIS), aux

    specs_aux = {"expert_counts": P(AXIS), "balance": P(AXIS), "dropped": P(AXIS)}
    # check_vma=False: with it, differentiating the expert-parallel shard_map nested in a stage
    # names the (already manual) pipeline axis in its residuals' specs, which the partitioner
    # rejects ("axis already bound by a parent manual_computation", jax 0.12). Without it,
    # cotangents of the stage-replicated inputs (xs, cos, sin) are summed over the stages and
    # those of the replicated output divided by them (jax's convention, which keeps psum exact).
    fn = jax.shard_map(stage_program, in_specs=([P(AXIS)] * len(leaves), P(), P(), P()),
                       out_specs=(P(None, AXIS) if scatter else P(), specs_aux),
                       axis_names={AXIS}, check_vma=False)
    with use_rules(STAGE_RULES):
        ys, aux = fn(leaves, micro(x), micro(cos), micro(sin))
    return constrain(unmicro(ys), ACT), aux
