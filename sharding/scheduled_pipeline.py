"""The training loss through a pipeline schedule with explicit per-stage backward passes.

`pipeline_lm_loss` is `lm_loss` (dsv3_jax/train/losses.py) with the MoE stack pipelined by a
schedule of sharding/schedules.py (1f1b, zb, dualpipev; gpipe too, for comparison): same
total, parts and outputs, same gradients. What runs where is sharding/pipeline.py's
`StagePlan` (with 2P chunks of the stack for dualpipev): the embedding, dense layers and the
MoE layers that do not fill a round of chunks run before the pipeline on all devices, and
autodiff differentiates them as usual. The pipelined part is one `jax.custom_vjp` function of
(stage parameters, loss-head parameters, micro-batch inputs) whose forward rule runs the
whole schedule, forward and backward ticks, inside the shard_map over the pipeline axis
(sharding/pipeline_executor.py) and returns the loss with its gradients as residuals; the
backward rule scales them by the incoming cotangent. Only the total loss is differentiable
this way (the parts are reported, not differentiated).

Unlike GPipe, the loss head (final norm, MTP depths, chunked cross entropy) runs on the last
virtual stage, micro-batch by micro-batch, so that a micro-batch's backward can start as
soon as its forward is done; its parameters (norm, lm_head, embedding for MTP, MTP modules)
enter the stages whole (gathered over the pipeline axis, like GPipe's head) and their
gradients are summed over the stages on the way out. Each micro-batch's loss is normalised by
the whole batch's prediction weights (`losses.weight_sums`), and the sequence-wise balance
terms (a mean over sequences) by 1 / M, so that the micro-batches' losses add up to the
batch's.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from dsv3_jax.model import ACT, ModelOutput, Transformer
from dsv3_jax.train.losses import loss_from_output, weight_sums
from sharding.mesh import platform as mesh_platform
from sharding.pipeline import (AXIS, PipelineError, _stage_dispatcher, before_pipeline,
                               pipeline_stages, plan_stages, stage_rules)
from sharding.pipeline_executor import StageSetup, run_program
from sharding.stage_calculus import LayerStack, Vjp
from sharding.rules import constrain, use_rules
from sharding.schedule_program import compile_program
from sharding.schedules import ScheduleError, make_schedule


def pipeline_lm_loss(model: Transformer, batch: Int[Array, "batch seq_plus_1"], *, schedule: str,
                     microbatches: int, mtp_lambda: float = 0.3, balance_alpha: float = 1e-4,
                     segment_ids: Int[Array, "batch seq_plus_1"] | None = None,
                     loss_mask: Float[Array, "batch seq_plus_1"] | None = None,
                     denominators: Float[Array, "heads"] | None = None, chunk: int | None = None
                     ) -> tuple[Float[Array, ""], tuple[dict, ModelOutput]]:
    """`lm_loss(model, batch, ...)` with the MoE stack pipelined by `schedule` over the context
    mesh's pipeline axis, `microbatches` micro-batches (call under `jax.set_mesh` and jit).
    `out` carries the expert counts, balance terms and dropped rows (no hidden states)."""
    if pipeline_stages() < 2:
        raise PipelineError("pipeline_lm_loss needs a mesh with pipeline > 1 (jax.set_mesh)")
    cfg = model.cfg
    mesh = jax.sharding.get_abstract_mesh()
    stages = mesh.shape[AXIS]
    try:
        sched = make_schedule(schedule, stages, microbatches)
    except ScheduleError as e:
        raise PipelineError(str(e)) from None
    plan = plan_stages(cfg, stages, microbatches, chunks=sched.chunks, schedule=schedule)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    b, s = inputs.shape
    seg_in = None if segment_ids is None else segment_ids[:, :-1]
    x, cos, sin, aux_before, (gd, pipelined, treedef, layouts) = before_pipeline(
        model, inputs, None, seg_in, plan, mesh)
    depth = len(model.mtp) if mtp_lambda > 0 else 0
    if denominators is None:
        denominators = weight_sums(segment_ids, loss_mask, (b, s + 1), depth)
    m = microbatches

    def micro(a):  # micro-batch i holds rows i, i + m, ... (as sharding/pipeline.py)
        return None if a is None else a.reshape(b // m, m, *a.shape[1:]).swapaxes(0, 1)

    data = dict(ids=micro(inputs), targets=micro(targets), cos=micro(cos), sin=micro(sin),
                seg=micro(seg_in), seg_row=micro(segment_ids), mask_row=micro(loss_mask),
                den=denominators)
    post_graph, post_state = nnx.split((model.norm, *([model.mtp] if depth else [])))
    # the embedding only when MTP reads it (else the stages would carry its gradient for nothing)
    post_params = (post_state, model.lm_head[...], model.embed_tokens[...] if depth else None)
    if sched.chunks == 2:  # device d holds virtual stages d and 2P - 1 - d (the V)
        n = plan.moe_per_stage
        order = np.concatenate([np.r_[d * n:(d + 1) * n, (2 * stages - 1 - d) * n:
                                      (2 * stages - d) * n] for d in range(stages)])
        pipelined = [v[order] for v in pipelined]
    pipelined = [jax.lax.with_sharding_constraint(v, spec) for v, spec in zip(pipelined, layouts)]
    cross = jnp.float32 if mesh_platform(mesh) == "cpu" else x.dtype  # see sharding/pipeline.py
    ctx = dict(graphdef=gd, treedef=treedef, post_graph=post_graph, plan=plan, sched=sched,
               remat=model.remat, dtype=model.dtype, mtp_lambda=mtp_lambda, depth=depth,
               balance_alpha=balance_alpha, chunk=chunk, cross=cross)
    total, parts, aux = _scheduled(ctx)(pipelined, post_params, micro(x).astype(cross), data)
    # the stages' expert counts, balance terms and dropped rows in layer order
    aux = dict(aux, stack=_layer_order(aux["stack"], sched))
    if aux_before is not None:
        aux["stack"] = {k: jnp.concatenate([aux_before[k], aux["stack"][k]])
                        for k in aux["stack"]}
    stack, post = aux["stack"], aux["post"]
    pre_balance = jnp.sum(aux_before["balance"]) if aux_before is not None else 0.0
    total = total + balance_alpha * pre_balance
    balance = jnp.sum(stack["balance"]) + parts["mtp_balance"]
    parts = {"loss": total, "ce": parts["ce"], "mtp": parts["mtp"], "balance": balance}
    out = ModelOutput(logits=None, hidden=None, mtp_logits=(), expert_counts=stack["expert_counts"],
                      balance=stack["balance"], dropped=stack["dropped"])
    if depth:
        out.mtp_expert_counts, out.mtp_balance = post["mtp_counts"], post["mtp_balance"]
    return total, (parts, out)


def _layer_order(stack: dict, sched) -> dict:
    """[stages, chunks, layers, ...] -> [virtual stages x layers, ...]: layer order."""
    order = [sched.place(v) for v in range(sched.virtual_stages)]
    return jax.tree.map(lambda a: jnp.concatenate([a[s, c] for s, c in order]), stack)


def _scheduled(ctx):
    """The custom_vjp function (stage leaves, loss-head params, xs, data) -> (loss, parts, aux)."""
    prog = compile_program(ctx["sched"])

    @jax.custom_vjp
    def run(pipelined, post_params, xs, data):
        return _execute(ctx, prog, pipelined, post_params, xs, data)[0]

    def fwd(pipelined, post_params, xs, data):
        out, grads = _execute(ctx, prog, pipelined, post_params, xs, data)
        return out, grads

    def bwd(grads, g):
        scale = g[0]
        return (*jax.tree.map(lambda d: (d * scale).astype(d.dtype), grads), None)

    run.defvjp(fwd, bwd)
    return run


def _execute(ctx, prog, pipelined, post_params, xs, data):
    sched, plan = ctx["sched"], ctx["plan"]
    M, n = sched.microbatches, plan.moe_per_stage
    gd, treedef = ctx["graphdef"], ctx["treedef"]

    def stage_program(pipelined, post_params, xs, data):
        dispatcher = _stage_dispatcher(gd, pipelined, treedef)

        def layer(params, x, consts):
            block = nnx.merge(gd, jax.tree.unflatten(treedef, params))
            if dispatcher is not None:
                block.mlp.dispatcher = dispatcher
            y, aux = block(x, *consts)
            return (constrain(y, ACT), aux["balance"]), {"expert_counts": aux["expert_counts"],
                                                         "dropped": aux["dropped"]}

        def consts(i):
            return (data["cos"][i], data["sin"][i], None if data["seg"] is None else data["seg"][i])

        def make_post(i):
            # checkpointed: its residuals are its input (the stage's output) and the micro-
            # batch's data; the backward recomputes the head (saving it would store, per
            # slot, values as large as lm_head, e.g. the chunked loss's view of it)
            d = {k: (None if v is None or k == "den" else v[i]) for k, v in data.items()}
            d["den"] = data["den"]
            return jax.checkpoint(lambda params, y: _post_loss(ctx, params, y, d, dispatcher))

        stack = LayerStack(jax.checkpoint(layer) if ctx["remat"] else layer, n)
        st = StageSetup(stack=stack, post=Vjp(), consts=consts, make_post=make_post,
                        params=pipelined, post_params=post_params, xs=xs,
                        balance_ct=ctx["balance_alpha"] / M, act_dtype=ctx["dtype"])
        c = run_program(prog, st)
        aux = {"stack": {k: v[None] for k, v in c["aux"].items()}}
        aux["stack"]["balance"] = aux["stack"]["balance"] / M   # a mean over the batch's sequences
        parts = jax.lax.psum(c["post_aux"]["parts"], AXIS)
        post = jax.lax.psum(c["post_aux"]["mtp"], AXIS)
        loss = jax.lax.psum(c["loss"], AXIS)
        grads = (c["grads"],
                 jax.lax.psum(c["post_grads"], AXIS),
                 jax.lax.psum(c["dxs"].astype(ctx["cross"]), AXIS))
        return (loss, parts, {"stack": aux["stack"], "post": post}), grads

    stack_spec = {"expert_counts": P(AXIS), "balance": P(AXIS), "dropped": P(AXIS)}
    fn = jax.shard_map(
        stage_program, in_specs=(P(AXIS), P(), P(), P()),
        out_specs=((P(), P(), {"stack": stack_spec, "post": P()}), (P(AXIS), P(), P())),
        axis_names={AXIS}, check_vma=False)
    with use_rules(stage_rules()):
        return fn(pipelined, post_params, xs, data)


def _post_loss(ctx, params, y, d, dispatcher):
    """One micro-batch's loss from the last virtual stage's output: final norm, MTP depths,
    chunked cross entropy; normalised by the whole batch's weights (`d["den"]`)."""
    (state, lm_head, embed), M = params, ctx["sched"].microbatches
    norm, *mtp = nnx.merge(ctx["post_graph"], state)
    mtp = mtp[0] if mtp else ()
    hidden = norm(y)
    zero = jnp.zeros((0,), jnp.float32)
    out = ModelOutput(logits=None, hidden=hidden, mtp_logits=(), expert_counts=None,
                      balance=zero, dropped=None)
    mtp_counts, mtp_balance = None, jnp.zeros((), jnp.float32)
    if ctx["depth"]:
        for module in mtp:
            if dispatcher is not None:
                module.block.mlp.dispatcher = dispatcher
        embed_fn = lambda ids: constrain(jnp.take(embed, ids, axis=0).astype(ctx["dtype"]), ACT)  # noqa: E731
        # Transformer.mtp_forward reads only `.mtp` of the model
        out.mtp_hidden, mtp_counts, balances = Transformer.mtp_forward(
            types.SimpleNamespace(mtp=mtp), d["ids"], hidden, d["cos"], d["sin"], d["seg"],
            embed=embed_fn)
        out.mtp_balance = balances / M
        mtp_balance = jnp.sum(out.mtp_balance)
    total, parts = loss_from_output(out, d["targets"], mtp_lambda=ctx["mtp_lambda"],
                                    balance_alpha=ctx["balance_alpha"], lm_head=lm_head,
                                    dtype=ctx["dtype"], segment_ids=d["seg_row"],
                                    loss_mask=d["mask_row"], denominators=d["den"],
                                    chunk=ctx["chunk"])
    parts = {"ce": parts["ce"], "mtp": parts["mtp"], "mtp_balance": mtp_balance}
    mtp_aux = {} if mtp_counts is None else {"mtp_counts": mtp_counts, "mtp_balance": out.mtp_balance}
    return total, {"parts": parts, "mtp": mtp_aux}

