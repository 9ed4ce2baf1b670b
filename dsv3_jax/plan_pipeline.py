"""The planner's pipeline-schedule terms: what a schedule holds per device, from its table.

GPipe (`--pipeline-schedule gpipe`, autodiff of the tick loop) keeps every tick's layer
inputs: (M + P - 1) x (layers per stage + 1) activations (dsv3_jax/plan.py). The other
schedules run sharding/pipeline_executor.py, whose buffers have the slot counts of
sharding/schedule_program.py, computed from the schedule's table:
- residuals: `res` slots (the table's peak of micro-batch chunks in flight: P on 1F1B's
  first stage, P for zb, 2P + 1 chunks for dualpipev) x n layers per chunk x one layer's
  saved values: its input with --remat ([tok_mb, D] in the compute dtype), else its working
  set (blockwise attention + expert dispatch buffers, as the planner counts a layer);
- stash (zb, dualpipev): `stash` slots x n x what a layer's B hands its W: the output
  gradients of the weight matmuls W computes, [tok_mb, width] in fp32, `STASH_WIDTH` widths
  (the MLA projections' outputs, the shared experts', the router's);
- inboxes: `act` + `grad` slots of [tok_mb, D]; the micro-batch inputs and their gradients
  (xs, dxs: 2 x M x [tok_mb, D]) that every stage holds;
- the loss head on the last virtual stage: its parameters (final norm, lm_head, MTP modules
  and, with MTP, the embedding) enter the stages gathered over the pipeline axis, and their
  gradients accumulate there (fp32): 2 x their bytes per device with the pipeline axis dropped;
- stage copies: as GPipe's, plus one for dualpipev, whose stack is permuted into the V
  (device d holds chunks d and 2P - 1 - d) every step.
Parameters per device are the same for every schedule (dualpipev's two chunks are half the
layers each).
"""

from __future__ import annotations

import jax.numpy as jnp

from dsv3_jax.plan_state import shard_elements, variables


def stash_width(cfg) -> int:
    """Per token: the widths of the output gradients a layer's W reads (fp32)."""
    H = cfg.num_attention_heads
    q = (2 * cfg.q_lora_rank if cfg.q_lora_rank else 0) + H * cfg.qk_head_dim
    kv = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim + H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    shared = 2 * cfg.n_shared_experts * cfg.moe_intermediate_size
    return q + kv + 3 * cfg.hidden_size + shared + cfg.n_routed_experts


def loss_head_bytes(setup, dtype, mtp: bool) -> int:
    """The loss head's parameters per device as the stages use them (gathered over the pipeline
    axis): final norm, lm_head, MTP modules and, with MTP, the embedding."""
    sizes = dict(setup.sizes, pipeline=1)
    wanted = ("norm", "lm_head") + (("mtp", "embed_tokens") if mtp else ())
    n = sum(shard_elements(v.axes, v.shape, sizes) for v in variables(setup.config)
            if v.is_param and v.path[0] in wanted)
    return n * jnp.dtype(dtype).itemsize


def schedule_parts(setup, *, tok: float, tok_mb: float, c: int, layer_working: float,
                   stage_copy: int) -> tuple[dict[str, int], list[str]]:
    """(parts, notes) replacing GPipe's activations and stage copies for a schedule run by
    the executor (module docstring)."""
    from sharding.pipeline import plan_stages
    from sharding.schedule_program import compile_program
    from sharding.schedules import make_schedule
    cfg, P, M = setup.config, setup.stages, setup.microbatches
    sched = make_schedule(setup.pipeline_schedule, P, M)
    prog = compile_program(sched)
    plan = plan_stages(cfg, P, M, chunks=sched.chunks)
    n, D = plan.moe_per_stage, cfg.hidden_size
    before = cfg.num_dense_layers + plan.moe_before
    saved = tok_mb * D * c if setup.remat else layer_working
    residuals = prog.slots["res"] * n * saved
    stash = prog.slots["stash"] * n * tok_mb * stash_width(cfg) * 4 if sched.split_backward else 0
    inboxes = (prog.slots["act"] + prog.slots["grad"] + 2 * M) * tok_mb * D * c
    checkpoints = before * tok * D * c if setup.remat else before * layer_working
    uneven = cfg.num_moe_layers % P != 0
    copies = 1 + int(uneven or sched.chunks == 2)
    parts = {"activations": int(checkpoints + residuals + stash + inboxes + layer_working),
             "loss_head": 2 * loss_head_bytes(setup, setup.param_jnp, setup.mtp and
                                              cfg.num_nextn_predict_layers > 0),
             "stage_copies": copies * stage_copy}
    peak = max(sched.peak_activations())
    notes = [f"{setup.pipeline_schedule}: {prog.slots['res']} residual slots of {n} layers "
             f"(table peak {peak} micro-batch chunks in flight), "
             f"{prog.slots['stash']} stash slots, {prog.slots['act']} + {prog.slots['grad']} "
             f"inbox slots; bubble {sched.bubble_fraction():.1%} (table, F=1 B=2 W=1), "
             f"{sched.bubble_fraction(lockstep=True):.1%} in lockstep ticks"]
    return parts, notes
