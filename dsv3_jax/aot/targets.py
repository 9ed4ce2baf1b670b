"""Compile targets: fake CPU devices, TPU slices and GPU hosts, all compiled on this machine.

`--target NAME[:TOPOLOGY]`:
- `cpu`: N fake XLA:CPU devices (`--xla_force_host_platform_device_count`), the default;
- `tpu-v4`, `tpu-v5e`, `tpu-v5p`, `tpu-v6e`: compile-only TPU devices from libtpu
  (`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x4")`);
  TOPOLOGY is the slice's chip grid (`4x4x4` for v4/v5p, `16x16` for v5e/v6e);
- `h100`, `h200`, `b200`, `a100`: XLA:GPU's deviceless compilation for that GPU model (the
  `GpuTargetConfigProto` XLA keeps for it, read from the CUDA plugin's library) on
  TOPOLOGY = `HOSTSxGPUS` (`32x8`: 32 hosts of 8 GPUs).
Without a TOPOLOGY the smallest standard one with the mesh's device count is used. Every target
compiles under JAX_PLATFORMS=cpu: nothing here needs an accelerator, only the compiler packages
(`pip install -e ".[aot]"`: libtpu and the CUDA plugin pinned to the installed jax).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import os
import re

CPU_FLAGS = "--xla_disable_hlo_passes=all-reduce-promotion"
# Sorts need CUB kernels that only a present GPU can pick; XLA's one-shot all-reduce kernel and
# collective kernels are Triton fusions that crashed LLVM in the deviceless 671B compile.
GPU_FLAGS = ("--xla_gpu_deviceless_cub_mode=DEVICELESS_CUB_DISABLED "
             "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false "
             "--xla_gpu_experimental_use_collective_kernels=")
INSTALL = 'pip install -e ".[aot]"'

# name: (libtpu generation, grid dims, devices per chip, planner device)
TPUS = {"tpu-v4": ("v4", 3, 2, "tpu-v4"), "tpu-v5e": ("v5e", 2, 1, "tpu-v5e"),
        "tpu-v5p": ("v5p", 3, 1, "tpu-v5p"), "tpu-v6e": ("v6e", 2, 1, "tpu-v6e")}
# name: (the device_description_str of XLA's target config, planner device)
GPUS = {"h100": ("NVIDIA H100 80GB HBM3", "h100-80g"), "h200": ("NVIDIA H200 141GB HBM3e", "h200"),
        "b200": ("NVIDIA B200", "b200"), "a100": ("NVIDIA A100-SXM4-80GB", "a100-80g")}
COMPUTE_CAPABILITY = {"h100": "9.0", "h200": "9.0", "b200": "10.0", "a100": "8.0"}
NAMES = ("cpu", *TPUS, *GPUS)
# standard slice shapes (chips), smallest first
GRIDS = {3: ["1x1x1", "2x1x1", "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
             "8x8x8", "8x8x16", "8x16x16", "16x16x16"],
         2: ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]}


class TargetError(ValueError):
    """A target that does not parse, does not match the mesh, or whose compiler is missing."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: backend, model and topology (see the module docstring)."""

    name: str
    topology: str = ""

    @property
    def platform(self) -> str:
        return "cpu" if self.name == "cpu" else "tpu" if self.name in TPUS else "cuda"

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.topology}" if self.topology else self.name

    @property
    def planner_device(self) -> str | None:
        """The planner's DEVICES key for this target (None: CPU, no verdict of its own)."""
        return TPUS[self.name][3] if self.name in TPUS else GPUS[self.name][1] if self.name in GPUS else None

    @property
    def device_count(self) -> int | None:
        if self.name in TPUS:
            return math.prod(int(d) for d in self.topology.split("x")) * TPUS[self.name][2]
        if self.name in GPUS:
            hosts, gpus = self.topology.split("x")
            return int(hosts) * int(gpus)
        return None

    def xla_flags(self, devices: int) -> str:
        """XLA_FLAGS for this target's process (set before JAX starts)."""
        if self.platform == "cpu":
            return f"--xla_force_host_platform_device_count={devices} {CPU_FLAGS}"
        return GPU_FLAGS if self.platform == "cuda" else ""

    def environ(self, devices: int) -> dict[str, str]:
        """The environment a compile for this target needs (JAX on CPU, the target's flags)."""
        env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": self.xla_flags(devices)}
        if self.platform == "tpu":  # no TPU metadata server here; several compiles may run at once
            env.update(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
        return env

    def devices(self, n: int) -> list:
        """n devices of this target (after `environ` took effect)."""
        import jax
        if self.platform == "cpu":
            if jax.device_count() < n:
                raise TargetError(
                    f"the mesh needs {n} devices and JAX has {jax.device_count()}: run in a fresh "
                    f"process with XLA_FLAGS='{self.xla_flags(n)}' (python -m dsv3_jax.aot does this)")
            return jax.devices()[:n]
        from jax.experimental import topologies
        if self.platform == "tpu":
            _require("libtpu", "the TPU compiler (libtpu)")
            gen = TPUS[self.name][0]
            topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{self.topology}")
        else:
            hosts, gpus = self.topology.split("x")
            topo = topologies.get_topology_desc(
                platform="cuda", topology_name="", topology=f"1x{hosts}x{gpus}",
                target_config=gpu_target_config(GPUS[self.name][0]))
            _target_cudnn_checks(COMPUTE_CAPABILITY[self.name])
            _target_tokamax_checks(COMPUTE_CAPABILITY[self.name])
        devices = list(topo.devices)
        if len(devices) != n:
            raise TargetError(f"target {self.spec} has {len(devices)} devices; the mesh has {n}")
        return devices


def parse_target(text: str, devices: int) -> Target:
    """`Target` from "NAME[:TOPOLOGY]" for a mesh of `devices` devices (see the module docstring)."""
    name, _, topology = (text or "cpu").strip().partition(":")
    name = name.lower()
    if name not in NAMES:
        raise TargetError(f"unknown target {name!r}: use one of {', '.join(NAMES)}")
    if name == "cpu":
        if topology:
            raise TargetError(f"target cpu takes no topology (got {topology!r}): the mesh's "
                              "device count is used")
        return Target("cpu")
    if name in TPUS:
        dims, per_chip = TPUS[name][1], TPUS[name][2]
        if not topology:
            fits = [g for g in GRIDS[dims] if math.prod(map(int, g.split("x"))) * per_chip == devices]
            if not fits:
                sizes = ", ".join(f"{math.prod(map(int, g.split('x'))) * per_chip} ({g})"
                                  for g in GRIDS[dims])
                raise TargetError(f"no standard {name} slice has {devices} devices (standard: "
                                  f"{sizes}); give --target {name}:TOPOLOGY")
            topology = fits[0]
        if not re.fullmatch(r"\d+" + r"x\d+" * (dims - 1), topology):
            raise TargetError(f"{name} topology {topology!r}: expected {dims} chip counts like "
                              f"{GRIDS[dims][4]}")
    else:
        if not topology:
            if devices > 8 and devices % 8:
                raise TargetError(f"{devices} GPUs are not whole hosts of 8: give --target "
                                  f"{name}:HOSTSxGPUS")
            topology = f"{max(1, devices // 8)}x{min(devices, 8)}"
        if not re.fullmatch(r"\d+x\d+", topology):
            raise TargetError(f"{name} topology {topology!r}: expected HOSTSxGPUS like 32x8")
    target = Target(name, topology)
    if target.device_count != devices:
        raise TargetError(f"target {target.spec} has {target.device_count} devices but the mesh "
                          f"has {devices}")
    return target


def _target_cudnn_checks(capability: str) -> None:
    """JAX's cuDNN attention checks the compute capability of the local GPU before lowering;
    a deviceless compile has none, so the checks are answered for the target's GPU."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:  # a JAX without the cuDNN attention module: nothing to answer
        return
    have = tuple(int(v) for v in capability.split("."))
    fa.check_compute_capability = lambda cap: have >= tuple(int(v) for v in cap.split("."))
    fa.is_cuda_compute_capability_equal = lambda cap: cap == capability


def _target_tokamax_checks(capability: str) -> None:
    """tokamax (the optional GPU grouped-GEMM kernels, dsv3_jax/layers/platform_gmm.py) picks
    its Mosaic GPU kernel (sm90, sm100) by the compute capability of JAX's default device, the
    CPU in a deviceless compile: answered for the target's GPU."""
    try:
        from tokamax._src import gpu_utils
    except Exception:  # noqa: BLE001 - not installed (or another layout): nothing to answer
        return
    cc = float(capability)
    gpu_utils._compute_capability = lambda device=None: cc


def _require(module: str, what: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise TargetError(f"{what} is not installed: {INSTALL} (installs libtpu and the CUDA "
                          "plugin at the installed jax's version; no accelerator needed)")


@functools.lru_cache(maxsize=None)
def gpu_target_config(description: str) -> str:
    """XLA's GpuTargetConfigProto (text format) for a GPU model, from the CUDA plugin's library.

    XLA embeds one per supported model (h100_sxm, h200, b200, a100 ...), each starting with a
    license header and naming its `device_description_str`."""
    _require("jax_plugins.xla_cuda12", "XLA:GPU (the jax CUDA plugin)")
    import jax_plugins.xla_cuda12 as plugin
    folder = os.path.dirname(plugin.__file__)
    libs = [f for f in os.listdir(folder) if f.startswith("xla_cuda_plugin") and f.endswith(".so")]
    if not libs:
        raise TargetError(f"no xla_cuda_plugin*.so in {folder}: reinstall with {INSTALL}")
    with open(os.path.join(folder, libs[0]), "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.find(f'device_description_str: "{description}"'.encode())
        if at < 0:
            raise TargetError(f"the CUDA plugin has no target config for {description!r}")
        start, end = data.rfind(b"\0", 0, at) + 1, data.find(b"\0", at)
        return data[start:end].decode()
