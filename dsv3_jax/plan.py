"""Cluster planner: per-device memory and FLOPs of a training or serving layout, and meshes that fit.

    python -m dsv3_jax.plan --config configs/deepseek-v3-671b.json \\
        --mesh pipeline=8,expert=32 --device h100-80g --batch 256 --seq 4096
    python -m dsv3_jax.plan --config ... --mesh expert=32 --device h200 --batch 64 --seq 4096 --serve
    python -m dsv3_jax.plan --config ... --devices 256 --device h100-80g --batch 256 --seq 4096

Everything is per device, in bytes, for the layout `sharding/rules.py` gives the mesh (the
same table the model uses, so the planner cannot drift from the code). Notation: mesh axes
P (pipeline), Dd (data), Fs (fsdp), X (expert), T (tensor); D hidden size, V vocab, F the
expert FFN width, H heads, E routed experts, k experts per token, S sequence length, c the
compute itemsize (2 for bf16), p the parameter itemsize, m the moments' itemsize.

State (exact): for every variable of the abstract model (`abstract_model`, shapes only),
  shard bytes = prod(shape) / prod(mesh axes its logical axes map to) * itemsize.
- params: all nnx.Param shards in the parameter dtype (fp32 master weights by default);
- optimizer: AdamW's mu (in the moments dtype: optax's `mu_dtype`) and nu (always in the
  parameter dtype), laid out like the params;
- gradients (a temporary of the step): like the params, in the parameter dtype (twice with
  --accumulate > 1: the running sum and one micro-batch's).

Activations of one step (training; `--remat` keeps only each layer's input, the default):
- tok = (batch / accumulate) * S / (Dd Fs X P) tokens per device outside the pipeline stages,
  tok_mb = (batch / accumulate / M) * S / (Dd Fs X) per pipeline micro-batch inside a stage;
- checkpoints: D * c * (layers before the pipeline * tok + (M + P - 1) ticks * (layers per
  stage + 1) * tok_mb), i.e. every layer input of every tick the GPipe scan keeps for its
  backward pass, and the tick loop's stacked outputs (one [tok_mb, D] per tick);
- one layer's working set at its backward (the largest of the forward it recomputes):
  blockwise attention's `attention.working_set_bytes` (q, k, v, output and their gradients,
  512 x 512 fp32 score tiles; linear in S), and the
  expert-parallel dispatch of tok_mb tokens (dsv3_jax/plan_dispatch.py): R = X * cap rows per
  device, cap = tok_mb * min(k, E / X) (dropless) or ceil(cf * tok_mb * k / X) (capacity
  factor cf); 6 row buffers of D values (send, receive, grouped, returned, and their
  gradients) and 6 of F / T values (gate, up, their product and gradients), in c bytes
  (on XLA:CPU the counts its step holds for the experts' kernel);
- vocabulary: the head and embedding are FSDP-split along D and gathered whole for the
  step: VOCAB_COPIES * V / T * D * p. At the step's peak (inside the layers' backward
  pass) XLA still holds the head it gathered for the forward pass (the `all-gather` of
  lm_head); the head's and the embedding's full gradients are not live there (buffer live
  ranges of the V2-Lite and 671B steps at their peaks, `python -m dsv3_jax.aot --dump`);
- logits: the chunked loss (dsv3_jax/train/losses.py) holds one vocabulary chunk at a time, of
  C = vocab_chunk(tok, V / T) entries (LOGITS_CHUNK_BYTES of fp32 logits per device):
  (LOSS_CHUNK_BUFFERS + heads - 1) * tok * C * 4 (logits and their gradient; heads = main +
  MTP, which share the chunk loop), the chunk's lm_head slice D * C * 6 (fp32 and compute
  dtype) and heads * 3 * tok * D * 4 (the hidden states' fp32 gradient, the final norm's):
  `losses.loss_peak_bytes`, within ~20% of XLA:CPU (tests/test_chunked_loss.py,
  benchmarks/chunked_loss.py). Whole logits would be tok * V / T * 4 * 2 per head: 4.2 GB
  per 4K-token V3 row;
- gathered: the largest layer's weights as its matmuls use them, i.e. with their FSDP dims
  ("embed", and "q_lora" / "kv_lora" of q_b_proj / kv_b_proj) gathered over the FSDP axes,
  less the stored shard, twice (the weights and their full gradient before its
  reduce-scatter), in p bytes. Small when experts are split over the expert axis; ~11 GB for
  a V3 layer whose 256 experts are FSDP-split instead;
- stage copies (P > 1): W = the stage's pipelined layers in the layout the stage uses
  (`layer_split_spec` in sharding/pipeline.py: split by layer over P, the other dims as
  stored without P), in p bytes. The GPipe tick loop carries the stage's weights as loop
  state, and XLA copies them into it (the parameter buffers are donated and updated in
  place, so the loop does not read them where they lie): one W, seen as `copy` buffers of
  the stage's weight shapes live through the forward and backward passes (`--dump`). A
  stack the stage count does not divide (V3's 58 MoE layers on 8 stages) is stored
  FSDP-split over P and resharded to its stages before the loop: a second W.

Serving (the engine's decode step, bf16 by default):
- params as above; the latent cache: layers * slots / (Dd Fs X) * context *
  (kv_lora_rank + qk_rope_head_dim) * c (the cache's "layers" axis is also split over P);
- the step's temporaries: logits 2 * slots * V * 4, one layer's gathered weights (as in
  training, once) and the expert dispatch buffers of the slots' tokens;
- capacity: the most slots (a multiple of Dd Fs X) whose whole estimate fits: the cache,
  logits and dispatch buffers grow with the slots.

Serving the official FP8 checkpoint as stored (`--serve --precision fp8`, a config with a
`quantization_config`; what load_hf(precision="fp8") keeps, dsv3_jax/plan_state.py):
- FP8 weights: every linear weight except lm_head and the MoE gate (so q/kv projections,
  o_proj, dense, shared and routed experts' gate/up/down, MTP eh_proj). Each is two arrays,
  placed by `sharding.rules.quantized_specs` (the table, restricted to splits at block
  boundaries; a dim whose split would cut 128-blocks drops that mesh axis, e.g. q_b_proj's
  1536 and kv_b_proj's 512 latent dims on expert=8 are held whole):
    values  prod(shard of [lead..., out..., in...]) * 1 byte (e4m3),
    scales  prod(shard of [lead..., ceil(N / b0), ceil(K / b1)]) * 4 bytes (fp32),
  with K, N the products of the input and output dims, b = 128 x 128, the values in the
  checkpoint's [out, in] orientation, split over the mesh axes the table gives the parameter's
  logical dims, the scales over those of the leading, first output and first input dims;
- the rest (embedding, lm_head, MoE gate, norms) as above in bf16, the routing bias in fp32;
- gathered: the largest layer's FSDP-split values and scales (1 and 4 bytes) less the shard;
- cache, logits and dispatch buffers as in bf16 serving (bf16 activations and latent cache).
  No relayout copy of the weights: the [out, in] values are K-major (contraction dim minor),
  the operand layout of XLA:GPU's FP8 GEMMs. (Held [in, out] they cost the 671B step on
  expert=8 an 85 GB transposed copy of every e4m3 weight; SCALE.md.) Not counted: weights
  whose input dim is FSDP-split are gathered along their minor dim, which XLA:GPU does through
  transposed copies of the local shards (0.4 GB on that step) and of one layer's weight.

FLOPs (dsv3_jax/train/flops.py): training 6 x activated matmul weights + causal attention per
token, times the tokens of a step; decoding 2 x activated weights + absorbed attention over
the context, 2 * H * context * (2 * kv_lora_rank + qk_rope_head_dim) per layer.

The figures are checked against XLA's memory analysis of the compiled steps
(dsv3_jax/aot/, tests/test_plan.py, tests/test_aot_targets.py, SCALE.md). A device fits when the total is at most
(1 - HEADROOM) of its memory: the rest is left to the runtime (CUDA context, NCCL buffers,
fragmentation); set XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 so JAX may use that much.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.attention import working_set_bytes as attention_working_set
from dsv3_jax.plan_dispatch import dispatch_bytes, dispatch_rows, row_buffers
from dsv3_jax.plan_state import (FSDP_AXES, fp8_layouts,  # noqa: F401
                                 gathered_layer_bytes, shard_elements, stage_layer_bytes, state_bytes, stored_fp8)
from dsv3_jax.train.losses import loss_peak_bytes
from sharding.mesh import AXES, MeshError, parse_mesh_spec

GiB = 2**30
HEADROOM = 0.08
VOCAB_COPIES = 1
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory: int          # bytes, as the driver reports them
    peak_flops: float    # dense bf16 FLOP/s


DEVICES = {
    "h100-80g": Device("NVIDIA H100 80GB", 81559 * 2**20, 989e12),
    "h200": Device("NVIDIA H200 141GB", 143771 * 2**20, 989e12),
    "a100-80g": Device("NVIDIA A100 80GB", 81920 * 2**20, 312e12),
    "a100-40g": Device("NVIDIA A100 40GB", 40960 * 2**20, 312e12),
    "tpu-v5p": Device("TPU v5p", 95 * GiB, 459e12),
    "tpu-v4": Device("TPU v4", 32 * GiB, 275e12),
    "tpu-v5e": Device("TPU v5e", 16 * GiB, 197e12),
    "tpu-v6e": Device("TPU v6e", 32 * GiB, 918e12),
    "b200": Device("NVIDIA B200", 191514411008, 2250e12),  # XLA's B200 target config
}
DEVICES["h200-141g"] = DEVICES["h200"]


def fits(total: int, device: Device) -> bool:
    """Whether `total` bytes per device fit `device`, leaving HEADROOM to the runtime."""
    return total <= (1 - HEADROOM) * device.memory


@dataclasses.dataclass(frozen=True)
class Setup:
    """A layout to plan or compile: model, mesh, batch, precision, and train or serve."""

    config: ModelConfig
    mesh: tuple[tuple[str, int], ...]    # all five axes, in sharding.mesh.AXES order
    batch: int                           # sequences per optimizer step / engine slots
    seq: int                             # training sequence length / serving context
    serve: bool = False
    accumulate: int = 1
    microbatches_arg: int = 0            # pipeline micro-batches (0: one per stage)
    pipeline_schedule: str = "gpipe"     # sharding/schedules.py
    param_dtype: str = "fp32"            # training: fp32 master weights; serving: bf16
    moments_dtype: str = "bf16"
    precision: str = "bf16"              # compute: bf16 activations and matmuls
    remat: bool = True
    capacity_factor: float | None = None
    mtp: bool = True
    config_path: str = ""

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def mesh_spec(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.mesh if n > 1) or "data=1"

    @property
    def devices(self) -> int:
        return math.prod(n for _, n in self.mesh)

    @property
    def stages(self) -> int:
        return self.sizes["pipeline"]

    @property
    def microbatches(self) -> int:
        return (self.microbatches_arg or self.stages) if self.stages > 1 else 1

    @property
    def compute(self):
        from dsv3_jax.layers.linear import Precision
        return Precision(DTYPES["fp32" if self.precision == "fp32" else "bf16"],
                         self.precision == "fp8")

    @property
    def param_jnp(self):
        return DTYPES[self.param_dtype]

    @property
    def moments_jnp(self):
        return DTYPES[self.moments_dtype]

    def describe(self) -> str:
        what = (f"serve {self.batch} slots x {self.seq} context" if self.serve else
                f"train batch {self.batch} x {self.seq}, accumulate {self.accumulate}, "
                f"{self.microbatches} micro-batches"
                f"{f' ({self.pipeline_schedule})' if self.stages > 1 else ''}, moments "
                f"{self.moments_dtype}, "
                f"remat {'on' if self.remat else 'off'}")
        cf = f", capacity factor {self.capacity_factor}" if self.capacity_factor else ", dropless"
        params = self.param_dtype
        if self.serve and self.precision == "fp8" and self.config.fp8_block_size is not None:
            params = f"fp8 as stored (e4m3 + fp32 block scales; the rest {self.param_dtype})"
        return (f"{self.config_path or 'model'} on {self.mesh_spec}: {what}, params "
                f"{params}, compute {self.precision}{cf}")


def make_setup(config, mesh: str, devices: int | None = None, **kw) -> Setup:
    """A Setup from a config (path or ModelConfig) and a mesh spec like "pipeline=8,expert=32"."""
    path = ""
    if not isinstance(config, ModelConfig):
        path, config = str(config), ModelConfig.from_json(config)
    if devices is None:
        devices = math.prod(int(p.split("=")[1]) for p in mesh.split(",") if "=" in p)
    sizes = parse_mesh_spec(mesh, devices)
    if not kw.get("mtp", True):
        config = config.replace(num_nextn_predict_layers=0)
    return Setup(config=config, mesh=tuple((a, sizes[a]) for a in AXES), config_path=path, **kw)


# ------------------------------------------------------------------------------- estimate
@dataclasses.dataclass
class Estimate:
    """Per-device bytes by part, FLOPs, and the verdict inputs."""

    parts: dict[str, int]
    flops_per_token: float
    tokens_per_step: int
    notes: list[str]
    capacity_slots: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def fits(self, device: Device) -> bool:
        return fits(self.total, device)

    def as_dict(self) -> dict:
        return dict(parts=self.parts, total=self.total, flops_per_token=self.flops_per_token,
                    flops_per_step=self.flops_per_step, notes=self.notes,
                    capacity_slots=self.capacity_slots)


def estimate(setup: Setup, platform: str | None = None) -> Estimate:
    """Per-device memory and FLOPs of `setup` (formulas in the module docstring) on `platform`
    ("tpu", "cuda" or "cpu"; on "cpu" the routed experts' kernel,
    dsv3_jax/layers/platform_gmm.py, sets the dispatch buffers; default an accelerator's)."""
    buffers = row_buffers(setup, platform)
    return _serve(setup, buffers) if setup.serve else _train(setup, buffers)


def _train(setup: Setup, buffers: tuple[int, int]) -> Estimate:
    from dsv3_jax.train.flops import flops_per_token
    cfg, s = setup.config, setup.sizes
    P, M, S = setup.stages, setup.microbatches, setup.seq
    c, p = 2 if setup.precision != "fp32" else 4, jnp.dtype(setup.param_jnp).itemsize
    D, V, T, H = cfg.hidden_size, cfg.vocab_size, s["tensor"], cfg.num_attention_heads
    inner = s["data"] * s["fsdp"] * s["expert"]
    micro = setup.batch / setup.accumulate
    tok = micro * S / (inner * P)
    tok_mb = micro / M * S / inner
    params, elements, other = state_bytes(setup, setup.param_jnp)
    mom = jnp.dtype(setup.moments_jnp).itemsize
    parts = {"params": params + other, "optimizer": elements * (mom + p),
             "gradients": params * (2 if setup.accumulate > 1 else 1)}
    if P > 1:
        per_stage = cfg.num_moe_layers // P
        before = cfg.num_dense_layers + cfg.num_moe_layers % P
        held = before * tok + (M + P - 1) * (per_stage + 1) * tok_mb
    else:
        held = cfg.num_hidden_layers * tok
    R = dispatch_rows(setup, tok_mb)
    attention = attention_working_set(tok_mb, S, H / T, cfg.qk_head_dim, cfg.v_head_dim, c)
    dispatch = dispatch_bytes(setup, R, c, buffers)
    if setup.remat:
        parts["activations"] = int(held * D * c + attention + dispatch)
    else:  # every layer keeps its working set for the backward pass
        layers = cfg.num_hidden_layers / P
        parts["activations"] = int(held * D * c + layers * (attention + dispatch))
    parts["vocab"] = int(VOCAB_COPIES * V / T * D * p)
    parts["gathered"] = 2 * gathered_layer_bytes(setup, setup.param_jnp)
    uneven = P > 1 and cfg.num_moe_layers % P != 0
    if P > 1:
        parts["stage_copies"] = (2 if uneven else 1) * stage_layer_bytes(setup, setup.param_jnp)
    heads = 1 + (cfg.num_nextn_predict_layers if setup.mtp else 0)
    local_vocab = V / T if V % T == 0 else V  # a vocabulary the tensor axis does not divide: whole
    parts["logits"] = loss_peak_bytes(tok, D, local_vocab, heads)
    notes = [f"dispatch: R = {R:,} rows per device per MoE layer "
             f"({'dropless' if setup.capacity_factor is None else f'capacity factor {setup.capacity_factor}'})"]
    if setup.capacity_factor is None and setup.sizes["expert"] > 1:
        notes.append("dropless dispatch: a lower bound. XLA keeps more worst-case row buffers "
                     "live than counted here (671B at expert=128: the compiler needed ~2x this "
                     "total, SCALE.md); use --capacity-factor on large meshes")
    if uneven:
        notes.append(f"{cfg.num_moe_layers} MoE layers are not divisible by {P} stages: the "
                     f"stack is stored FSDP-split over the pipeline axis, its last "
                     f"{P * (cfg.num_moe_layers // P)} layers resharded to their stages each "
                     "step (sharding/pipeline.py; counted in stage_copies)")
    if P > 1 and setup.pipeline_schedule != "gpipe":
        # the executor's buffers, from the schedule's table; the loss head runs per
        # micro-batch on the last virtual stage (dsv3_jax/plan_pipeline.py)
        from dsv3_jax.plan_pipeline import schedule_parts
        sched_parts, sched_notes = schedule_parts(
            setup, tok=tok, tok_mb=tok_mb, c=c, layer_working=attention + dispatch,
            stage_copy=stage_layer_bytes(setup, setup.param_jnp))
        del parts["vocab"]
        parts.update(sched_parts, logits=loss_peak_bytes(tok_mb, D, local_vocab, heads))
        notes = sched_notes + notes
    return Estimate(parts, flops_per_token(cfg, S), setup.batch * S, notes)


def _cache_bytes_per_slot(setup: Setup) -> float:
    """One slot's latent cache on the devices that hold it (all layers, full context)."""
    cfg = setup.config
    layers = cfg.num_dense_layers + cfg.num_moe_layers
    c = 4 if setup.precision == "fp32" else 2
    return layers / setup.stages * setup.seq * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * c


def _serve(setup: Setup, buffers: tuple[int, int]) -> Estimate:
    from dsv3_jax.train.flops import activated_matmul_params
    cfg, s = setup.config, setup.sizes
    shards = s["data"] * s["fsdp"] * s["expert"]
    if setup.batch % shards:
        raise MeshError(f"{setup.batch} slots are not divisible by the {shards} batch shards "
                        "(data x fsdp x expert) of the mesh")
    params, _, other = state_bytes(setup, setup.param_jnp)
    per_slot = _cache_bytes_per_slot(setup)
    V = cfg.vocab_size
    c = 2 if setup.precision != "fp32" else 4
    fixed = {"params": params + other, "gathered": gathered_layer_bytes(setup, setup.param_jnp)}

    def parts_for(slots: int) -> dict[str, int]:  # slots per batch shard
        R = dispatch_rows(setup, slots)
        return {"params": fixed["params"], "kv_cache": int(slots * per_slot),
                "gathered": fixed["gathered"],
                "activations": int(slots * shards * V * 4 * 2 + dispatch_bytes(setup, R, c, buffers))}

    parts = parts_for(setup.batch // shards)
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * setup.seq / 2 * (
        2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    est = Estimate(parts, 2 * activated_matmul_params(cfg) + attn, setup.batch, [])
    for name, dev in DEVICES.items():
        # the most slots whose whole estimate fits (cache, logits and dispatch buffers grow
        # with them): from the cache-only bound down
        usable = (1 - HEADROOM) * dev.memory
        n = max(0, int((usable - sum(fixed.values())) // per_slot))
        while n and sum(parts_for(n).values()) > usable:
            n -= 1
        est.capacity_slots[name] = n * shards
    return est


def check_batch(setup: Setup) -> None:
    """Raise MeshError unless the batch splits over the mesh (and its micro-batches)."""
    s = setup.sizes
    inner = s["data"] * s["fsdp"] * s["expert"]
    micro = setup.batch // setup.accumulate
    if setup.serve:
        return
    if setup.batch % setup.accumulate or micro % (inner * setup.stages) or \
            (micro // setup.microbatches) % inner:
        raise MeshError(f"batch {setup.batch} in {setup.accumulate} accumulation step(s) of "
                        f"{micro} sequences, {setup.microbatches} pipeline micro-batch(es) each, "
                        f"does not split over the {inner * setup.stages} batch shards of "
                        f"{setup.mesh_spec}")


if __name__ == "__main__":  # the command line lives in plan_cli.py
    from dsv3_jax.plan_cli import main
    sys.exit(main())
