"""Multi-host start-up: `jax.distributed.initialize` from the launcher's environment.

Launch one process per host (or per group of local devices) with either
- `JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i` (any launcher, and
  several processes on one machine for testing), or
- a cluster JAX detects by itself: Slurm (`SLURM_NTASKS` > 1), Open MPI (`OMPI_COMM_WORLD_SIZE`
  > 1), Cloud TPU pods, Kubernetes JobSets.
Without any of these, training is single-process and nothing is initialised. On CPU the
cross-process collectives go through gloo (JAX-NOTES: the default CPU client has none).
"""

from __future__ import annotations

import os

import jax

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(env, name: str) -> int:
    value = env.get(name)
    if value is None:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {name} is not; a multi-process "
                         f"launch needs all of {', '.join(ENV_VARS)}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _cluster_detected(env) -> bool:
    """True where JAX's own cluster detection applies with more than one process."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if var in env and env[var].isdigit() and int(env[var]) > 1:
            return True
    return "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"]


def initialize_from_env(env=None) -> bool:
    """Join the multi-process job the environment describes; True if there is one.

    Call before any JAX computation (train.py and serve.py do, first thing). Idempotent.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        num, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={num})")
        _cpu_collectives(env)
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=num, process_id=pid)
        return True
    if _cluster_detected(env):
        _cpu_collectives(env)
        jax.distributed.initialize()
        return True
    return False


def _cpu_collectives(env) -> None:
    if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
