"""Distribution for dsv3-jax: meshes, logical-axis rules, expert-parallel dispatch, pipeline.

The model code speaks logical axes only (each parameter carries `logical_axes` metadata, see
dsv3_jax/layers/linear.py); this package is the only place that knows mesh axes.
"""
