"""Distribution for dsv3-jax: meshes, logical-axis rules, expert-parallel dispatch, pipeline.

The model code speaks logical axes only (each parameter carries `logical_axes` metadata, see
dsv3_jax/layers/linear.py); this package is the only place that knows mesh axes.
"""

from sharding.mesh import AXES, MeshError, describe, make_mesh
from sharding.rules import RULES, constrain, logical_to_spec, state_shardings, use_rules

__all__ = ["AXES", "MeshError", "RULES", "constrain", "describe", "logical_to_spec", "make_mesh",
           "state_shardings", "use_rules"]
