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
- the MoE stack's last `P * (n_moe // P)` layers: `n_moe // P` consecutive layers per stage;
- before the pipeline, split over ALL devices (the pipeline axis joins the batch axes): the
  embedding, every dense layer and the first `n_moe % P` MoE layers, i.e. the layers that do
  not fill a whole round of stages. No identity padding: nothing is computed for nothing, and
  these layers have no bubble (V3 on 8 stages: 3 dense + 2 MoE of 61 layers; 7 per stage);
- after the pipeline, also over all devices: the final norm, the head and the MTP module.
  Spreading them over the P x (data, fsdp, expert) devices costs 1/P of their time on the
  last stage, where they would lengthen every tick or run serially after the loop.
Parameters (sharding/rules.py): a stack whose length P divides is split over the pipeline axis
by layer ("layers" -> "pipeline"), so each stage holds exactly its layers and reads them in
place. Everything else (embedding, head, MTP, the dense stack, a MoE stack P does not divide)
is split over the pipeline axis along its "embed" dimension, FSDP-style: no stage holds a full
copy, and each step gathers what it uses (a stage's layers of an unevenly split stack are
resharded to it before the stages run, an all-to-all over the pipeline axis that keeps their
expert and tensor splits; their gradients leave by the transpose).
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
from dsv3_jax.model import ACT, ModelOutput, Transformer, check_token_ids, default_positions
from sharding.expert_parallel import ExpertParallelDispatcher
from sharding.mesh import platform as mesh_platform
from sharding.rules import active_rules, constrain, logical_to_spec, use_rules

AXIS = "pipeline"


def stage_rules() -> dict[str, tuple[str, ...]]:
    """The rules inside a stage, where the pipeline axis is manual: the active ones without it
    (the batch is split over the other batch axes only)."""
    return {k: tuple(a for a in v if a != AXIS) for k, v in active_rules().items()}


class PipelineError(ValueError):
    """A pipeline layout that cannot run (too few layers, micro-batches that do not fit)."""


SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "zb": "ZB-H1", "dualpipev": "DualPipeV"}


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Which layers run before the pipeline and how many each stage holds."""

    stages: int
    microbatches: int
    dense_before: int          # dense layers, all run before the pipeline
    moe_before: int            # MoE layers [0, moe_before) run before the pipeline
    moe_per_stage: int         # MoE layers per chunk: virtual stage v holds layers
                               # moe_before + v * moe_per_stage + [0, moe_per_stage)
    chunks: int = 1            # chunks per stage (2: dualpipev's V)
    schedule: str = "gpipe"    # sharding/schedules.py

    @property
    def bubble(self) -> float:
        """The schedule's idle share of a step, from its table (F = 1, B = 2, W = 1; GPipe
        and 1F1B: (P - 1) / (M + P - 1))."""
        from sharding.schedules import make_schedule
        return make_schedule(self.schedule, self.stages, self.microbatches).bubble_fraction()

    def describe(self) -> str:
        before = f"{self.dense_before} dense + {self.moe_before} MoE" if self.moe_before else \
            f"{self.dense_before} dense"
        per = (f"{self.chunks} chunks x {self.moe_per_stage}" if self.chunks > 1 else
               f"{self.moe_per_stage}")
        if self.schedule == "gpipe":
            bubble = f"GPipe bubble (P-1)/(M+P-1) = {self.bubble:.1%}"
        else:
            from sharding.schedules import make_schedule
            peak = max(make_schedule(self.schedule, self.stages, self.microbatches)
                       .peak_activations())
            bubble = (f"{SCHEDULE_NAMES[self.schedule]} bubble {self.bubble:.1%} (from its "
                      f"table, F=1 B=2 W=1), at most {peak} micro-batch chunks in flight")
        return (f"pipeline: {self.stages} stages x {per} MoE layers ({before} layers before "
                f"it, on all devices), {self.microbatches} micro-batches, {bubble}")


def pipeline_stages() -> int:
    """The context mesh's pipeline axis size (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(AXIS, 1)


def plan_stages(cfg, stages: int, microbatches: int, *, chunks: int = 1,
                schedule: str = "gpipe") -> StagePlan:
    """The stage assignment for `stages` pipeline stages of `chunks` chunks each (see the
    module docstring; the MoE layers that do not fill a round of chunks run before)."""
    if microbatches < 1:
        raise PipelineError(f"microbatches must be >= 1, got {microbatches}")
    n_moe, v = cfg.num_moe_layers, stages * chunks
    if n_moe < v:
        what = f"{stages} stages" + (f" x {chunks} chunks" if chunks > 1 else "")
        raise PipelineError(
            f"the pipeline axis has {what} but the model has only {n_moe} MoE layers "
            f"(of {cfg.num_hidden_layers}; the {cfg.num_dense_layers} dense layers run before "
            f"the pipeline): use at most {n_moe // chunks} stages")
    return StagePlan(stages=stages, microbatches=microbatches, dense_before=cfg.num_dense_layers,
                     moe_before=n_moe % v, moe_per_stage=n_moe // v, chunks=chunks,
                     schedule=schedule)


def pipeline_forward(model: Transformer, input_ids: Int[Array, "batch seq"],
                     positions: Int[Array, "batch seq"] | None = None, *, microbatches: int,
                     segment_ids: Int[Array, "batch seq"] | None = None, mtp: bool = False,
                     logits: bool = True) -> ModelOutput:
    """`model.forward` with the MoE layers pipelined over the context mesh's pipeline axis.

    Call under `jax.set_mesh(mesh)` (and `jit`). Same outputs as `model.forward`, including the
    per-layer expert counts, balance terms and dropped rows in layer order; `segment_ids`
    (packed documents) and `logits=False` (hidden states only, for the chunked loss) as there.
    """
    if pipeline_stages() < 2:
        raise PipelineError("pipeline_forward needs a mesh with pipeline > 1 (jax.set_mesh)")
    cfg = model.cfg
    mesh = jax.sharding.get_abstract_mesh()
    plan = plan_stages(cfg, mesh.shape[AXIS], microbatches)
    x, cos, sin, aux_before, (gd, pipelined, treedef, layouts) = before_pipeline(
        model, input_ids, positions, segment_ids, plan, mesh)
    x, aux = _pipeline(gd, pipelined, layouts, treedef, x, cos, sin, segment_ids, plan,
                       model.remat)
    if aux_before is not None:
        aux = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), aux_before, aux)
    hidden = model.norm(x)
    out = ModelOutput(logits=model.head(hidden) if logits else None, hidden=hidden, mtp_logits=(),
                      expert_counts=aux["expert_counts"], balance=aux["balance"],
                      dropped=aux["dropped"])
    if mtp and len(model.mtp):
        # the shifted embeddings pinned to the batch layout: XLA would otherwise split them
        # along "embed" like the pipeline-split eh_proj, through a full rematerialisation (jax 0.12)
        out.mtp_hidden, out.mtp_expert_counts, out.mtp_balance = model.mtp_forward(
            input_ids, hidden, cos, sin, segment_ids, embed=lambda ids: constrain(model.embed(ids), ACT))
        if logits:
            out.mtp_logits = tuple(model.head(h) for h in out.mtp_hidden)
    return out


def before_pipeline(model: Transformer, input_ids: Int[Array, "batch seq"],
                    positions: Int[Array, "batch seq"] | None,
                    segment_ids: Int[Array, "batch seq"] | None, plan: StagePlan, mesh):
    """What runs on every device before the pipelined MoE layers (any schedule): the embedding,
    the dense layers and the `plan.moe_before` MoE layers that do not fill a round of stages.
    Returns (x, cos, sin, their aux or None, (graphdef, the pipelined layers' leaves, treedef,
    the leaves' stage layouts))."""
    check_token_ids(input_ids, model.cfg.vocab_size)
    b, s = input_ids.shape
    check_microbatches(b, plan, mesh)
    cos, sin = rope_cos_sin(model.cfg, default_positions((b, s), positions, segment_ids))
    x = constrain(model.embed(input_ids), ACT)
    if model.dense_layers is not None:
        x, _ = _run_layers(*_split(model.dense_layers), x, cos, sin, model.remat,
                           segment_ids=segment_ids)
    gd, leaves, treedef = _split(model.moe_layers)
    layouts = [_layer_split_spec(var, mesh) for var in _variables(model.moe_layers)]
    r = plan.moe_before
    aux_before = None
    if r:
        x, aux_before = _run_layers(gd, [v[:r] for v in leaves], treedef, x, cos, sin, model.remat,
                                    segment_ids=segment_ids)
    return x, cos, sin, aux_before, (gd, [v[r:] for v in leaves], treedef, layouts)


def check_microbatches(batch: int, plan: StagePlan, mesh) -> None:
    """Raise unless `batch` splits into the plan's micro-batches and those over a stage's devices."""
    m = plan.microbatches
    if batch % m:
        raise PipelineError(f"the batch of {batch} sequences is not divisible by --microbatches {m}")
    axes = [a for a in stage_rules()["batch"] if mesh.shape.get(a, 1) > 1]
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


def _variables(stack) -> list[nnx.Variable]:
    """The stack's variables, in the order of `_split`'s leaves."""
    return jax.tree.leaves(nnx.state(stack), is_leaf=lambda v: isinstance(v, nnx.Variable))


def _layer_split_spec(var: nnx.Variable, mesh) -> P:
    """`layer_split_spec` of a stacked variable."""
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    return layer_split_spec(axes, var.shape, mesh)


def layer_split_spec(axes, shape, mesh) -> P:
    """Where a stacked array's pipelined layers go: split by layer over the pipeline axis,
    every other dimension as stored but without the pipeline axis (which the storage may use
    for "embed" when the stage count does not divide the stack, sharding/rules.py). `mesh`
    needs only `.shape` (the planner passes axis sizes)."""
    stored = logical_to_spec(axes, shape, mesh)
    rest = []
    for entry in tuple(stored)[1:] + (None,) * (len(shape) - len(stored)):
        names = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
                      if a is not None and a != AXIS)
        rest.append(names if len(names) > 1 else (names[0] if names else None))
    return P(AXIS, *rest)


def _run_layers(graphdef, leaves, treedef, x, cos, sin, remat: bool, dispatcher=None,
                segment_ids=None):
    """Scan the stacked blocks over x; aux stats stacked per layer (like the model's stacks)."""
    def layer(x, layer_leaves):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
        if dispatcher is not None and block.is_moe:
            block.mlp.dispatcher = dispatcher
        x, aux = block(x, cos, sin, segment_ids)
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


def _pipeline(graphdef, leaves, layouts, treedef, x, cos, sin, segment_ids, plan: StagePlan,
              remat: bool):
    """GPipe over the pipeline axis: [batch, seq, embed] through `plan.stages` stages.

    `leaves`: the pipelined layers' state ([stages x layers per stage, ...] each), `layouts`:
    their layer-split specs (`_layer_split_spec`). A leaf stored otherwise (a stack the stage
    count does not divide) is resharded to it here, outside the shard_map, so that XLA's
    partitioner moves it (an all-to-all over the pipeline axis) and keeps its expert and tensor
    splits; the transpose returns the gradients to the storage layout."""
    n_stages, m = plan.stages, plan.microbatches
    b = x.shape[0]
    mb = b // m
    mesh, rules = jax.sharding.get_abstract_mesh(), stage_rules()
    # On CPU, xs and ys cross the stages in fp32: XLA:CPU aborts on a bf16 all-reduce here
    # ("Invalid binary instruction opcode copy" in its all-reduce-promotion pass): the outputs'
    # psum and the transposes that sum xs's cotangent over the stages (check_vma=False, below).
    # Exact: stage 0 casts xs back, and one stage contributes to each sum, the others zeros.
    cross = jnp.float32 if mesh_platform(mesh) == "cpu" else x.dtype
    inner = math.prod(mesh.shape[a] for a in rules["batch"] if a in mesh.shape)
    # outside the stages the batch is split over (data, fsdp, expert, pipeline), pipeline
    # fastest: stage p's rows of a micro-batch are blocks p, P + p, 2P + p, ... of P x inner
    scatter = mb % (inner * n_stages) == 0

    # Micro-batch i holds rows i, i + m, i + 2m, ...: a device's contiguous slice of the batch
    # holds a contiguous slice of every micro-batch, so the split moves no data.
    def micro(a):
        return a.reshape(mb, m, *a.shape[1:]).swapaxes(0, 1)

    def unmicro(a):
        return a.swapaxes(0, 1).reshape(b, *a.shape[2:])

    def stage_program(leaves, xs, cos, sin, *seg):
        stage = jax.lax.axis_index(AXIS)
        dispatcher = _stage_dispatcher(graphdef, leaves, treedef)

        def tick(carry, t):
            i = t - stage                     # the micro-batch this stage works on
            valid = (i >= 0) & (i < m)
            i = jnp.clip(i, 0, m - 1)
            h = jnp.where(stage == 0, xs[i].astype(carry.dtype), carry)
            y, aux = _run_layers(graphdef, leaves, treedef, h, cos[i], sin[i], remat, dispatcher,
                                 segment_ids=seg[0][i] if seg else None)
            aux = {"expert_counts": jnp.where(valid, aux["expert_counts"], 0),
                   "balance": jnp.where(valid, aux["balance"], 0.0),
                   "dropped": jnp.where(valid, aux["dropped"], 0)}
            nxt = jax.lax.ppermute(y, AXIS, [(j, j + 1) for j in range(n_stages - 1)])
            return nxt, (y, aux)

        init = jnp.zeros(xs.shape[1:], x.dtype)
        _, (ys, aux) = jax.lax.scan(tick, init, jnp.arange(m + n_stages - 1))
        aux = {"expert_counts": aux["expert_counts"].sum(0), "dropped": aux["dropped"].sum(0),
               "balance": aux["balance"].sum(0) / m}  # balance: mean over sequences
        # the last stage's ys from tick P - 1 on are the outputs; hand every stage its rows
        # (a reduce-scatter) or, when the rows do not split that finely, all rows (all-reduce)
        # (in the `cross` dtype, like xs)
        ys = jnp.where(stage == n_stages - 1, ys[n_stages - 1:], 0).astype(cross)
        if scatter:
            ys = ys.reshape(m, inner, n_stages, mb // (inner * n_stages), *ys.shape[2:])
            return jax.lax.psum_scatter(ys, AXIS, scatter_dimension=2, tiled=True), aux
        return jax.lax.psum(ys, AXIS), aux

    specs_aux = {"expert_counts": P(AXIS), "balance": P(AXIS), "dropped": P(AXIS)}
    # check_vma=False: with it, differentiating the expert-parallel shard_map nested in a stage
    # names the (already manual) pipeline axis in its residuals' specs, which the partitioner
    # rejects ("axis already bound by a parent manual_computation", jax 0.12). Without it,
    # cotangents of the stage-replicated inputs (xs, cos, sin) are summed over the stages and
    # those of the replicated output divided by them (jax's convention, which keeps psum exact).
    leaves = [jax.lax.with_sharding_constraint(v, spec) for v, spec in zip(leaves, layouts)]
    seg = () if segment_ids is None else (micro(segment_ids),)
    fn = jax.shard_map(stage_program,
                       in_specs=([P(AXIS)] * len(leaves), P(), P(), P(), *[P()] * len(seg)),
                       out_specs=(P(None, None, AXIS) if scatter else P(), specs_aux),
                       axis_names={AXIS}, check_vma=False)
    with use_rules(rules):
        ys, aux = fn(leaves, micro(x).astype(cross), micro(cos), micro(sin), *seg)
    return constrain(unmicro(ys.reshape(m, mb, *ys.shape[-2:])).astype(x.dtype), ACT), aux
