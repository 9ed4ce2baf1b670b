"""Ahead-of-time compilation of the real train and decode steps for a simulated cluster.

`compile_train(setup)` / `compile_decode(setup)` lower and compile, for the mesh of a
`plan.Setup`, exactly the programs training and serving run:
- train: `dsv3_jax.train.step.train_step` (loss, gradients, AdamW, routing-bias update; the
  GPipe forward of sharding/pipeline.py when the mesh has pipeline > 1), state donated, as
  `train.py` runs it;
- decode: the serving engine's jitted `decode` step (dsv3_jax/serve/steps.py) over the latent
  cache of `setup.batch` slots x `setup.seq` positions, attending over the whole window.
Every input is a `jax.ShapeDtypeStruct` carrying its `NamedSharding` (parameters and optimizer
state placed by sharding/rules.py, the batch and the cache by their logical axes), so no
parameter is ever allocated: compiling the 671B model needs a few GB of host memory. The
compiler's `memory_analysis()` gives the per-device bytes that `plan.py` is checked against.

Simulated meshes use fake CPU devices, which must be requested before JAX starts its backend:
run `python -m dsv3_jax.aot --devices 256 ...` (a fresh process; it also caps its own address
space with --max-memory-gb to prove nothing is materialised), or `run_subprocess(...)`.
XLA:CPU's all-reduce-promotion pass aborts on the bf16 reduce-scatter / psum of the pipeline's
outputs ("Invalid binary instruction opcode copy"); the pass only widens bf16 collectives for
the CPU runtime, which AOT never runs, so `cpu_flags` disables it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

CPU_FLAGS = "--xla_disable_hlo_passes=all-reduce-promotion"


def cpu_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` fake CPU devices (and the AOT-only pass workaround)."""
    return f"--xla_force_host_platform_device_count={devices} {CPU_FLAGS}"


@dataclasses.dataclass
class Compiled:
    """What one AOT compile measured (bytes are per device)."""

    kind: str                # "train" or "decode"
    mesh: str
    lower_s: float
    compile_s: float
    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int
    peak_rss: int = 0        # this process's peak resident memory (bytes)

    @property
    def total(self) -> int:
        """Peak device memory of the step: inputs + temporaries + outputs not aliased to inputs."""
        return self.argument + self.temp + self.output - self.alias + self.generated_code


def _mesh(setup):
    from sharding import make_mesh
    import jax
    n = setup.devices
    if len(jax.devices()) < n:
        raise RuntimeError(f"the mesh {setup.mesh_spec} needs {n} devices and JAX has "
                           f"{len(jax.devices())}: run in a fresh process with XLA_FLAGS="
                           f"'{cpu_flags(n)}' (python -m dsv3_jax.aot does this)")
    return make_mesh(setup.mesh_spec, devices=jax.devices()[:n])


def _placed(state, mesh):
    """(abstract state whose leaves carry their NamedSharding, the shardings tree)."""
    import jax
    from flax import nnx
    from sharding.rules import variable_sharding
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=is_var)
    abstract = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        state, shardings, is_leaf=is_var)
    return abstract, shardings


def _measure(kind, setup, lower) -> Compiled:
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    return Compiled(kind=kind, mesh=setup.mesh_spec, lower_s=t1 - t0, compile_s=t2 - t1,
                    argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                    alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                    generated_code=m.generated_code_size_in_bytes,
                    peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def compile_train(setup) -> Compiled:
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

    mesh = _mesh(setup)
    model = abstract_model(setup.config, dtype=setup.compute, param_dtype=setup.param_jnp,
                           remat=setup.remat, mesh=mesh,
                           capacity_factor=setup.capacity_factor)
    tx = make_optimizer(model, moments_dtype=setup.moments_jnp)
    optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param), model)
    graphdef, state = nnx.split((model, optimizer))
    abstract, shardings = _placed(state, mesh)
    micro = setup.batch // setup.accumulate
    if setup.stages > 1:
        check_microbatches(micro, plan_stages(setup.config, setup.stages, setup.microbatches),
                           mesh)
    batch_sharding = NamedSharding(mesh, P(None, batch_axes(mesh) or None, None))
    batches = jax.ShapeDtypeStruct((setup.accumulate, micro, setup.seq + 1), jnp.int32,
                                   sharding=batch_sharding)
    step = functools.partial(train_step, mtp_lambda=0.3 if setup.mtp else 0.0,
                             microbatches=setup.microbatches)

    def run(state, batches):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = step(model, optimizer, batches)
        return nnx.state((model, optimizer)), metrics

    jitted = jax.jit(run, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh):
        return _measure("train", setup, lambda: jitted.lower(abstract, batches))


def compile_decode(setup) -> Compiled:
    """Lower and compile the engine's decode step for `setup` (a plan.Setup with serve=True)."""
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
    mesh = _mesh(setup)
    model = abstract_model(cfg, dtype=setup.compute, param_dtype=setup.param_jnp, mesh=mesh,
                           capacity_factor=setup.capacity_factor)
    graphdef, state = nnx.split(model)
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
    vec = lambda dt: jax.ShapeDtypeStruct((B,), dt, sharding=rep)  # noqa: E731
    sp = SamplingArrays(vec(jnp.float32), vec(jnp.int32), vec(jnp.float32), vec(jnp.uint32))
    weights, treedef = jax.tree.flatten(abstract)  # the steps take the state's leaves
    _, decode, _ = steps.jitted(graphdef, treedef)
    with jax.set_mesh(mesh):
        return _measure("decode", setup, lambda: decode.lower(
            weights, cache, vec(jnp.int32), vec(jnp.int32), vec(jnp.bool_), sp, window=T))


def compile_step(setup) -> Compiled:
    """`compile_decode` for serving setups, else `compile_train`."""
    return compile_decode(setup) if setup.serve else compile_train(setup)


def run_subprocess(args: list[str], *, timeout: float = 1800) -> dict:
    """Run `python -m dsv3_jax.aot ARGS --json -` in a fresh process; its result as a dict."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "dsv3_jax.aot", *args, "--json", "-"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"dsv3_jax.aot {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from dsv3_jax import plan, plan_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    plan_cli.add_setup_args(ap)
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="cap this process's address space (RLIMIT_AS) and fail if peak RSS "
                         "exceeds it: proof that no parameter is materialised")
    ap.add_argument("--json", default=None, help="write the result as JSON to this file ('-': stdout)")
    ap.add_argument("--dump", default=None, help="XLA dump folder (buffer assignment, HLO)")
    args = ap.parse_args(argv)
    setup = plan_cli.setup_from_args(args)
    flags = cpu_flags(setup.devices)
    if args.dump:
        flags += f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_"
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    limit = None
    if args.max_memory_gb:
        limit = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import jax
    if jax.device_count() < setup.devices:
        raise SystemExit(f"JAX started with {jax.device_count()} devices before XLA_FLAGS "
                         "could be set; run `python -m dsv3_jax.aot` in a fresh process")
    result = compile_step(setup)
    if limit is not None and result.peak_rss > limit:
        raise SystemExit(f"peak RSS {result.peak_rss / 2**30:.2f} GiB exceeds the limit of "
                         f"{args.max_memory_gb} GiB")
    estimate = plan.estimate(setup)
    out = dict(dataclasses.asdict(result), total=result.total, planner=estimate.as_dict(),
               setup=setup.describe())
    text = json.dumps(out)
    if args.json == "-":
        print(text)
    else:
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        print(plan_cli.comparison_table([(setup, result, estimate)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
