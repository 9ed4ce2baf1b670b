"""Lower and compile the real train, decode and prefill steps for a simulated cluster.

`compile_train(setup, target)` / `compile_decode` / `compile_prefill` lower and compile, for
the mesh of a `plan.Setup` on the devices of a `targets.Target`, exactly the programs training
and serving run:
- train: `dsv3_jax.train.step.train_step` (loss, gradients, AdamW, routing-bias update; the
  GPipe forward of sharding/pipeline.py when the mesh has pipeline > 1), state donated, as
  `train.py` runs it;
- decode: the serving engine's jitted `decode` step (dsv3_jax/serve/steps.py) over the latent
  cache of `setup.batch` slots x `setup.seq` positions, attending over the whole window;
- prefill: the engine's `prefill` step for its smallest batch (one prompt per batch shard) of
  `setup.seq` tokens, written into that cache.
Every input is a `jax.ShapeDtypeStruct` carrying its `NamedSharding` (parameters and optimizer
state placed by sharding/rules.py, the batch and the cache by their logical axes), so no
parameter is ever allocated: compiling the 671B model needs a few GB of host memory. The
compiler's `memory_analysis()` gives the per-device bytes that `plan.py` is checked against,
and dsv3_jax/aot/audit.py reads the optimized HLO.
"""

from __future__ import annotations

import dataclasses
import resource
import time

from dsv3_jax.aot import audit as hlo_audit
from dsv3_jax.aot.targets import Target

CPU = Target("cpu")


@dataclasses.dataclass
class Compiled:
    """What one AOT compile measured (bytes are per device)."""

    kind: str                # "train", "decode" or "prefill"
    mesh: str
    lower_s: float
    compile_s: float
    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int
    peak_rss: int = 0        # this process's peak resident memory (bytes)
    target: str = "cpu"
    device_kind: str = ""
    audit: dict = dataclasses.field(default_factory=dict)
    buffers: dict = dataclasses.field(default_factory=dict)  # a pipeline executor's, per stage

    @property
    def total(self) -> int:
        """Peak device memory of the step: inputs + temporaries + outputs not aliased to inputs."""
        return self.argument + self.temp + self.output - self.alias + self.generated_code


def _mesh(setup, target: Target):
    from sharding import make_mesh
    return make_mesh(setup.mesh_spec, devices=target.devices(setup.devices))


def _placed(state, mesh):
    """(abstract state whose leaves carry their NamedSharding, the shardings tree). A variable
    holding a `QuantizedWeight` gets one of two sharded ShapeDtypeStructs (values, scales)."""
    import jax
    from flax import nnx
    from dsv3_jax.fp8 import QuantizedWeight
    from sharding.rules import variable_sharding
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def place(v, s):
        w = v.get_value()
        if isinstance(w, QuantizedWeight):
            return v.replace(dataclasses.replace(
                w, q=jax.ShapeDtypeStruct(w.q.shape, w.q.dtype, sharding=s.q),
                scale=jax.ShapeDtypeStruct(w.scale.shape, w.scale.dtype, sharding=s.scale)))
        return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))

    shardings = jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=is_var)
    abstract = jax.tree.map(place, state, shardings, is_leaf=is_var)
    return abstract, shardings


def _stored_fp8(state, cfg):
    """The serving state with the official FP8 checkpoint's weights as load_hf(precision="fp8")
    keeps them: each a `QuantizedWeight` of float8_e4m3fn values (the checkpoint's [out, in]
    orientation) and fp32 block scales (plan_state.fp8_layouts), abstract; the rest unchanged."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from dsv3_jax.fp8 import QuantizedWeight
    from dsv3_jax.plan_state import fp8_layouts
    layouts = fp8_layouts(cfg)
    flat = []
    for path, v in nnx.to_flat_state(state):
        layout = layouts.get(tuple(path))
        if layout is not None:
            v = v.replace(QuantizedWeight(jax.ShapeDtypeStruct(layout.shape, jnp.float8_e4m3fn),
                                          jax.ShapeDtypeStruct(layout.scale_shape, jnp.float32),
                                          layout.block, layout.n_in))
        flat.append((path, v))
    return nnx.from_flat_state(flat)


def _measure(kind, setup, target: Target, mesh, lower) -> Compiled:
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis()
    except Exception:  # XLA:GPU's deviceless compile has none  # noqa: BLE001
        cost = None
    text = compiled.as_text()
    result = Compiled(kind=kind, mesh=setup.mesh_spec, lower_s=t1 - t0, compile_s=t2 - t1,
                      argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                      alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                      generated_code=m.generated_code_size_in_bytes,
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      target=target.spec, device_kind=mesh.devices.flat[0].device_kind,
                      audit=hlo_audit.audit(text, cost))
    result.hlo_text = text  # not a field: kept out of the JSON
    return result


def compile_train(setup, target: Target = CPU) -> Compiled:
    """Lower and compile `train_step` for `setup` (a plan.Setup with serve=False)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv3_jax.model import abstract_model
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.step import train_step
    from sharding.pipeline import check_microbatches, plan_stages
    from sharding.rules import batch_axes

    mesh = _mesh(setup, target)
    model = abstract_model(setup.config, dtype=setup.compute, param_dtype=setup.param_jnp,
                           remat=setup.remat, mesh=mesh,
                           capacity_factor=setup.capacity_factor)
    tx = make_optimizer(model, moments_dtype=setup.moments_jnp)
    optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param), model)
    graphdef, state = nnx.split((model, optimizer))
    abstract, shardings = _placed(state, mesh)
    micro = setup.batch // setup.accumulate
    if setup.stages > 1:
        from sharding.schedules import make_schedule
        chunks = make_schedule(setup.pipeline_schedule, setup.stages, setup.microbatches).chunks
        check_microbatches(micro, plan_stages(setup.config, setup.stages, setup.microbatches,
                                              chunks=chunks), mesh)
    batch_sharding = NamedSharding(mesh, P(None, batch_axes(mesh) or None, None))
    batches = jax.ShapeDtypeStruct((setup.accumulate, micro, setup.seq + 1), jnp.int32,
                                   sharding=batch_sharding)
    step = functools.partial(train_step, mtp_lambda=0.3 if setup.mtp else 0.0,
                             microbatches=setup.microbatches,
                             pipeline_schedule=setup.pipeline_schedule)

    def run(state, batches):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = step(model, optimizer, batches)
        return nnx.state((model, optimizer)), metrics

    jitted = jax.jit(run, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=0)
    from sharding import pipeline_executor
    pipeline_executor.last_buffers.clear()
    with jax.set_mesh(mesh):
        result = _measure("train", setup, target, mesh, lambda: jitted.lower(abstract, batches))
    result.buffers = dict(pipeline_executor.last_buffers)
    return result


def _serving(setup, target: Target):
    """(mesh, step functions, the state's leaves, the empty cache, a per-slot array maker,
    sampling arrays) for the engine's steps on `setup`'s mesh, all abstract."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dsv3_jax.layers.mla import LatentCache
    from dsv3_jax.model import DecodeCache, abstract_model
    from dsv3_jax.serve import cache as kv
    from dsv3_jax.serve import steps
    from dsv3_jax.serve.sampling import SamplingArrays
    from sharding.rules import logical_to_spec

    cfg = setup.config
    mesh = _mesh(setup, target)
    model = abstract_model(cfg, dtype=setup.compute, param_dtype=setup.param_jnp, mesh=mesh,
                           capacity_factor=setup.capacity_factor)
    graphdef, state = nnx.split(model)
    from dsv3_jax.plan_state import stored_fp8
    if stored_fp8(setup):
        state = _stored_fp8(state, cfg)
    abstract, _ = _placed(state, mesh)
    B, T, dtype = setup.batch, setup.seq, model.dtype

    def sds(shape, dt, axes):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(
            mesh, logical_to_spec(axes, shape, mesh)))

    def latent(layers):
        return None if not layers else LatentCache(
            sds((layers, B, T, cfg.kv_lora_rank), dtype, kv.STACK_AXES),
            sds((layers, B, T, cfg.qk_rope_head_dim), dtype, kv.STACK_AXES))

    cache = DecodeCache(dense=latent(cfg.num_dense_layers), moe=latent(cfg.num_moe_layers))
    rep = NamedSharding(mesh, P())

    def vec(n, dt, *rest):  # host arrays the engine passes in: replicated
        return jax.ShapeDtypeStruct((n, *rest), dt, sharding=rep)

    def sampling(n):
        return SamplingArrays(vec(n, jnp.float32), vec(n, jnp.int32), vec(n, jnp.float32),
                              vec(n, jnp.uint32))

    weights, treedef = jax.tree.flatten(abstract)  # the steps take the state's leaves
    return mesh, steps.jitted(graphdef, treedef), weights, cache, vec, sampling


def compile_decode(setup, target: Target = CPU) -> Compiled:
    """Lower and compile the engine's decode step for `setup` (a plan.Setup with serve=True)."""
    import jax
    import jax.numpy as jnp

    mesh, (_, decode, _), weights, cache, vec, sampling = _serving(setup, target)
    B = setup.batch
    with jax.set_mesh(mesh):
        return _measure("decode", setup, target, mesh, lambda: decode.lower(
            weights, cache, vec(B, jnp.int32), vec(B, jnp.int32), vec(B, jnp.bool_),
            sampling(B), window=setup.seq))


def compile_prefill(setup, target: Target = CPU) -> Compiled:
    """Lower and compile the engine's prefill step for `setup` (serve=True): its smallest batch,
    one prompt of `setup.seq` tokens per batch shard, into the cache of `setup.batch` slots."""
    import jax
    import jax.numpy as jnp

    mesh, (prefill, _, _), weights, cache, vec, sampling = _serving(setup, target)
    s = setup.sizes
    n = s["data"] * s["fsdp"] * s["expert"]
    ids = vec(n, jnp.int32, setup.seq)
    with jax.set_mesh(mesh):
        return _measure("prefill", setup, target, mesh, lambda: prefill.lower(
            weights, cache, None, ids, ids, vec(n, jnp.int32), vec(n, jnp.int32),
            vec(n, jnp.bool_), vec(n, jnp.int32), sampling(n), window=0))


STEPS = {"train": compile_train, "decode": compile_decode, "prefill": compile_prefill}


def compile_step(setup, target: Target = CPU, step: str | None = None) -> Compiled:
    """Compile `step` ("train", "decode", "prefill"; default: decode when serving, else train)."""
    step = step or ("decode" if setup.serve else "train")
    if (step == "train") == setup.serve:
        raise ValueError(f"step {step!r} does not match the setup (serve={setup.serve})")
    return STEPS[step](setup, target)
