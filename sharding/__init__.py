"""Distribution for dsv3-jax: meshes, logical-axis rules, expert-parallel dispatch, pipeline.

The model code speaks logical axes only (each parameter carries `logical_axes` metadata, see
dsv3_jax/layers/linear.py); this package is the only place that knows mesh axes.
`sharding.pipeline` (imported on first use: it builds on dsv3_jax.model, which imports
`sharding.rules`) runs the model's layers as pipeline stages.
"""

from sharding.mesh import AXES, MeshError, describe, make_mesh
from sharding.rules import RULES, constrain, logical_to_spec, state_shardings, use_rules

__all__ = ["AXES", "MeshError", "PipelineError", "RULES", "constrain", "describe",
           "logical_to_spec", "make_mesh", "pipeline_forward", "plan_stages", "state_shardings",
           "use_rules"]


def __getattr__(name):
    if name in ("PipelineError", "pipeline_forward", "plan_stages"):
        from sharding import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sharding' has no attribute {name!r}")
