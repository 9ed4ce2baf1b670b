"""The backend attention kernels `attention` (dsv3_jax/layers/attention.py) dispatches to:
Pallas splash attention on TPU and cuDNN flash attention on NVIDIA GPUs, each run per shard of
the logical batch and heads axes, with MLA's split operands concatenated for them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sharding.mesh import platform as mesh_platform
from sharding.rules import logical_to_spec


def _platform() -> str:
    """The backend being compiled for: the context mesh's devices (AOT compiles for TPU/GPU
    run on the CPU backend), else JAX's default backend."""
    return mesh_platform(jax.sharding.get_abstract_mesh())


@functools.cache
def _have_cudnn() -> bool:
    """Whether cuDNN loads (always with jax[cuda]; an AOT host may lack it, then blockwise)."""
    try:
        from jax._src.lib import cuda_versions
        return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
    except Exception:  # no CUDA plugin, or the plugin without cuDNN
        return False


def _concat_heads(q_nope, q_pe, k_nope, k_pe):
    """MLA's split operands as one 192-dim query and key per head (k_pe broadcast)."""
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1]))
    return jnp.concatenate([q_nope, q_pe], -1), jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], -1)


def _pad_seq(multiple: int, *xs):
    """Zero tokens appended to a multiple of `multiple`: under a causal mask no real query sees
    them (they come after every real token), so the kernels' length rules cost nothing else."""
    pad = -xs[0].shape[1] % multiple
    return [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs]


def _per_shard(local, q_nope, q_pe, k_nope, k_pe, v, seg):
    """`local(q_nope, q_pe, k_nope, k_pe, v, seg)` on each device's shard of the logical batch
    and heads axes (`shard_map`; a kernel's custom call is not partitioned by XLA, and the cuDNN
    one's own partitioning rule fails inside the pipeline stages' shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_nope, q_pe, k_nope, k_pe, v, seg)
    spec = lambda axes, x: logical_to_spec(axes, x.shape, mesh)
    heads = ("batch", "seq", "heads", None)
    specs = (spec(heads, q_nope), spec(heads, q_pe), spec(heads, k_nope),
             spec(("batch", "seq", None), k_pe), spec(heads, v), spec(("batch", "seq"), seg))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec(heads, v),
                         check_vma=False)(q_nope, q_pe, k_nope, k_pe, v, seg)


def _cudnn(q_nope, q_pe, k_nope, k_pe, v, scale):
    """cuDNN flash attention (NVIDIA GPUs) per shard; V zero-padded to the 192-dim key width."""
    def local(qn, qp, kn, kp, v, _):
        s, dv = qn.shape[1], v.shape[-1]
        q, k = _concat_heads(qn, qp, kn, kp)
        q, k, v = _pad_seq(64, q, k, jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - dv)]))
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                           implementation="cudnn")
        return out[:, :s, :, :dv]

    seg = jnp.zeros(q_nope.shape[:2], jnp.int32)  # unused: shard_map needs every operand's spec
    return _per_shard(local, q_nope, q_pe, k_nope, k_pe, v, seg)


def _splash(q_nope, q_pe, k_nope, k_pe, v, scale, q_seg, k_seg):
    """Pallas splash attention (TPU), per shard of the logical batch and heads axes; forced on
    another backend it runs in Pallas interpret mode (slow: for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, seq, h, _ = q_nope.shape
    seg = jnp.zeros((b, seq), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
    q_nope, q_pe, k_nope, k_pe, v, seg = _pad_seq(128 if seq <= 512 else 512,
                                                  q_nope, q_pe, k_nope, k_pe, v, seg)
    s = q_nope.shape[1]
    blk = min(512, s)

    def local(qn, qp, kn, kp, v, seg):
        q, k = _concat_heads(qn * scale, qp * scale, kn, kp)
        heads = q.shape[2]
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(heads)]),
            head_shards=1, q_seq_shards=1, interpret=_platform() != "tpu",
            block_sizes=sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                                      block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                                      block_q_dq=blk, block_kv_dq=blk))
        one = lambda q, k, v, sg: kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                                         segment_ids=sk.SegmentIds(sg, sg)).swapaxes(0, 1)
        return jax.vmap(one)(q, k, v, seg)

    return _per_shard(local, q_nope, q_pe, k_nope, k_pe, v, seg)[:, :seq]
