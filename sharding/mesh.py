"""Device meshes from a short spec such as "data=2,expert=4".

Every mesh has the five axes in one fixed order, absent ones of size 1:
`pipeline, data, fsdp, expert, tensor`. The last axes vary fastest over the device list, which
is ordered by process then device id, so expert and tensor groups stay inside a host whenever
the host has enough devices (their all-to-alls and all-reduces are the chattiest).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("pipeline", "data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over these


class MeshError(ValueError):
    """A mesh spec that does not parse or does not fit the devices."""


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """{"data": 2, "expert": 4, ...} for all five axes; one axis may be -1 ("the rest")."""
    sizes = dict.fromkeys(AXES, 1)
    rest = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise MeshError(f"bad mesh spec part {part!r} in {spec!r}: expected AXIS=SIZE with AXIS "
                            f"one of {', '.join(AXES)}")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"bad mesh spec part {part!r}: size {value!r} is not an integer") from None
        if size == -1:
            if rest is not None:
                raise MeshError(f"mesh spec {spec!r}: only one axis may be -1")
            rest = name
        elif size < 1:
            raise MeshError(f"mesh spec {spec!r}: axis {name} has size {size}; sizes must be >= 1 or -1")
        sizes[name] = size
    fixed = math.prod(v for k, v in sizes.items() if k != rest)
    if rest is not None:
        if num_devices % fixed:
            raise MeshError(f"mesh spec {spec!r}: the other axes take {fixed} devices, which does "
                            f"not divide the {num_devices} devices available")
        sizes[rest] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"mesh spec {spec!r} needs {fixed} devices but {num_devices} are available "
                        "(use -1 on one axis for 'the rest')")
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    """A `Mesh` over all (or the given) devices with axes pipeline, data, fsdp, expert, tensor.

    `spec` like "data=2,expert=4" or "pipeline=2,fsdp=-1"; absent axes have size 1 and an empty
    spec puts every device on the data axis. Axis types are Auto: shardings propagate through
    `jit`, and `sharding/rules.py` pins parameters and layer-boundary activations.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec or "data=-1", len(devices))
    return Mesh(device_grid(devices, sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(devices, sizes: dict[str, int]) -> np.ndarray:
    """Devices arranged [pipeline, data, fsdp, expert, tensor], ordered by (process, id).

    The innermost axes take consecutive devices, which belong to one process (host) as long
    as expert x tensor fits in it: those groups never cross the slower inter-host network.
    """
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.empty(len(ordered), dtype=object)
    grid[:] = ordered
    return grid.reshape([sizes[a] for a in AXES])


def platform(mesh) -> str:
    """The platform ("cpu", "gpu", "tpu") of a Mesh's or AbstractMesh's devices; an abstract
    mesh without devices (or none at all) falls back to JAX's default backend. Ahead-of-time
    compiles for TPU or GPU run with the CPU backend, so code choosing per platform asks the
    mesh, not `jax.default_backend()`."""
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    if device is None and isinstance(mesh, Mesh):
        device = mesh.devices.flat[0]
    name = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def describe(mesh: Mesh) -> str:
    """"data=2,expert=4" style summary of the non-trivial axes."""
    parts = [f"{a}={mesh.shape[a]}" for a in mesh.axis_names if mesh.shape[a] > 1]
    return ",".join(parts) or "single device"
