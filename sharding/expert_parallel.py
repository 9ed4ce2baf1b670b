"""Expert parallelism: routed experts split over the mesh's expert axis, tokens moved by all-to-all.

Each device holds a slice of the batch (split over data, fsdp and expert) and E / ep experts.
Inside `jax.shard_map` every device
  1. buckets its (token, expert) rows by the expert shard that owns the expert,
  2. exchanges the buckets with `jax.lax.all_to_all` over the expert axis (fixed-size buffers:
     XLA:CPU cannot run `ragged_all_to_all`),
  3. runs its local experts on what it received with the grouped matmul (expert FFN widths may
     be split over the tensor axis: partial results are summed with `psum`),
  4. sends the results back with a second all-to-all, and hands each row's result to the
     weighted combine in dsv3_jax/layers/moe.py.

Dropless by default: a source sends at most `tokens * min(k, E / ep)` rows to one shard (a
token's k experts are distinct), and that is the bucket size, so nothing can overflow. With
`capacity_factor=c` buckets hold `ceil(c * tokens * k / ep)` rows; rows past that are dropped
(their expert output is zero) and counted.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.fp8 import QuantizedWeight, stored_order
from dsv3_jax.layers import grouped_matmul as gm
from dsv3_jax.layers.moe import expert_ffn, expert_layout
from sharding.mesh import platform as mesh_platform
from sharding.rules import BlockAlignmentError, batch_axes


def _offsets(sizes: jax.Array) -> jax.Array:
    return jnp.cumsum(sizes) - sizes


@dataclasses.dataclass(frozen=True)
class ExpertParallelDispatcher:
    """Dispatcher for the MoE layer over `mesh` (see the module docstring).

    `collective`: "dense" (fixed-size `all_to_all` buffers, runs everywhere), "ragged"
    (`ragged_all_to_all`: only routed rows travel; GPU/TPU, XLA:CPU cannot run it) or "auto"
    (ragged on GPU/TPU, dense on CPU).
    """

    mesh: Mesh
    capacity_factor: float | None = None  # None: dropless
    collective: str = "auto"
    expert_axis: str = "expert"
    tensor_axis: str = "tensor"

    def capacity(self, tokens: int, k: int, num_experts: int) -> int:
        """Rows one device may send to one expert shard (static)."""
        ep = self.mesh.shape[self.expert_axis]
        bound = tokens * min(k, num_experts // ep)
        if self.capacity_factor is None:
            return bound
        return max(1, min(bound, math.ceil(self.capacity_factor * tokens * k / ep)))

    def _ragged(self) -> bool:
        if self.collective not in ("auto", "dense", "ragged"):
            raise ValueError(f"collective={self.collective!r}: use 'auto', 'dense' or 'ragged'")
        if self.collective == "auto":
            return mesh_platform(self.mesh) in ("gpu", "tpu")
        return self.collective == "ragged"

    def __call__(self, x, experts, routed, num_experts):
        mesh, ep_axis, tp_axis = self.mesh, self.expert_axis, self.tensor_axis
        ep = mesh.shape[ep_axis]
        if num_experts % ep:
            raise ValueError(f"n_routed_experts ({num_experts}) is not divisible by the mesh's "
                             f"expert axis ({ep})")
        bax = batch_axes(mesh, include_trivial=True)  # size-1 axes keep shard_map's types exact
        shards = math.prod(mesh.shape[a] for a in bax)
        if x.shape[0] % shards:
            raise ValueError(f"{x.shape[0]} tokens cannot be split over the batch axes {bax} "
                             f"({shards} shards): the batch must be divisible by {shards}")
        t_local, k = x.shape[0] // shards, experts.shape[1]
        cap = self.capacity(t_local, k, num_experts)
        e_local = num_experts // ep
        precision = routed.precision
        exchange = _exchange_ragged if self._ragged() else _exchange_dense
        _check_blocks(routed.weights, mesh.shape[tp_axis], tp_axis)

        def local(x, experts, w_gate, w_up, w_down):
            d = x.shape[-1]
            flat = experts.reshape(-1)
            dest, local_e = flat // e_local, flat % e_local
            pos = gm.rank_within_group(dest, ep)
            keep = pos < cap
            rows = jnp.repeat(x, k, axis=0)
            recv_x, recv_e, send_back = exchange(rows, local_e, dest, pos, keep, ep, cap, ep_axis)
            valid = recv_e >= 0
            layout = expert_layout(jnp.where(valid, recv_e, 0), e_local,
                                   (w_gate, w_up, w_down), precision, valid=valid)
            # the tensor shards' partial products of the down projection are summed in fp32,
            # then rounded once, as the single-device product is (bf16 partial sums differed by
            # an ulp, which FP8's activation quantization can amplify into different tokens);
            # without a tensor split there is nothing to sum and the buffer stays in bf16
            y = expert_ffn((w_gate, w_up, w_down), gm.scatter_rows(recv_x, layout), layout,
                           precision, out_dtype=jnp.float32 if mesh.shape[tp_axis] > 1 else None)
            y = jax.lax.psum(gm.gather_rows(y, layout), tp_axis).astype(precision.dtype)
            out = jnp.where(keep[:, None], send_back(y), 0)
            counts = jax.lax.psum(jnp.zeros((num_experts,), jnp.int32).at[flat].add(1), bax)
            dropped = jax.lax.psum(jnp.sum(~keep).astype(jnp.int32), bax)
            return out.reshape(-1, k, d), counts, dropped

        row_spec = P(bax, None)
        # [experts, embed, width] and [experts, width, embed] (FP8 experts as stored: values and
        # scales [experts, out, in], the same split permuted)
        w_specs = [_weight_spec(w, spec) for w, spec in zip(
            routed.weights, ((ep_axis, None, tp_axis),) * 2 + ((ep_axis, tp_axis, None),))]
        fn = jax.shard_map(
            local, mesh=mesh,
            in_specs=(row_spec, row_spec, *w_specs),
            out_specs=(P(bax, None, None), P(), P()),
            check_vma=True)
        return fn(x, experts, *routed.weights)


def _weight_spec(w, spec: tuple) -> P:
    """The PartitionSpec of an expert stack split as `spec` says for its parameter layout
    [experts, in, out]; a QuantizedWeight's values and scales are [experts, out, in]."""
    return P(*stored_order(spec, 1, 1)) if isinstance(w, QuantizedWeight) else P(*spec)


def _check_blocks(weights, tp: int, tp_axis: str) -> None:
    """FP8 experts kept as stored (e4m3 values + block scales) are split over the tensor axis
    along their FFN width below, values and scales alike: the shards must hold whole blocks or
    a device's values would be scaled by another device's scales."""
    # the width is gate / up's output (N, block[0]) and down's input (K, block[1])
    for name, w, dim, b in zip(("gate_proj", "up_proj", "down_proj"), weights, (-1, -1, -2),
                               (0, 0, 1)):
        if not isinstance(w, QuantizedWeight) or tp == 1:
            continue
        width, block = w.shape[dim], w.block[b]
        if width % tp or (width // tp) % block:
            raise BlockAlignmentError(
                f"routed experts' {name}: an FFN width of {width} split over mesh axis {tp_axis} "
                f"({tp}) cuts its FP8 blocks of {block}; use a {tp_axis} axis whose shards hold "
                "whole blocks, or load with precision='bf16' (dequantized)")


def _exchange_dense(rows, local_e, dest, pos, keep, ep, cap, axis):
    """Fixed [ep, cap] buckets through `all_to_all`; returns received rows, their local expert
    ids (-1: empty slot) and a function sending results back into the rows' order."""
    d = rows.shape[-1]
    slot = jnp.where(keep, pos, cap)  # out of range: dropped
    send_x = jnp.zeros((ep, cap, d), rows.dtype).at[dest, slot].set(rows, mode="drop")
    send_e = jnp.full((ep, cap), -1, jnp.int32).at[dest, slot].set(local_e, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0).reshape(ep * cap, d)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0).reshape(-1)

    def send_back(y):
        back = jax.lax.all_to_all(y.reshape(ep, cap, d), axis, 0, 0)
        return back.at[dest, slot].get(mode="fill", fill_value=0)

    return recv_x, recv_e, send_back


def _exchange_ragged(rows, local_e, dest, pos, keep, ep, cap, axis):
    """Only the routed rows travel (`ragged_all_to_all`): rows sorted by destination are sent
    as one slice per peer; each receiver packs its sources' slices one after another."""
    n, d = rows.shape
    send_sizes = jnp.minimum(jnp.zeros((ep,), jnp.int32).at[dest].add(1), cap)
    send_off = _offsets(send_sizes)
    where = jnp.where(keep, send_off[dest] + pos, n)  # position in the sorted send buffer
    send_x = jnp.zeros((n, d), rows.dtype).at[where].set(rows, mode="drop")
    send_e = jnp.full((n,), -1, jnp.int32).at[where].set(local_e, mode="drop")
    recv_sizes = jax.lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)
    recv_off = _offsets(recv_sizes)
    # where my slice lands on each receiver: the offset that receiver gave me
    out_off = jax.lax.all_to_all(recv_off, axis, 0, 0, tiled=True)
    size = ep * cap
    # The output buffers are made like the rows (`zeros_like`), so they vary over the same mesh
    # axes: the result of ragged_all_to_all is typed by its output operand, and a plain
    # jnp.zeros would type the received rows as equal on every device. Their cotangents would
    # then be summed over the expert (and batch) axes in the backward pass: wrong gradients,
    # and a psum of the whole [rows, d] buffer per layer (found by the H100 HLO audit).
    recv_x = jax.lax.ragged_all_to_all(send_x, jnp.zeros_like(send_x, shape=(size, d)), send_off,
                                       send_sizes, out_off, recv_sizes, axis_name=axis)
    recv_e = jax.lax.ragged_all_to_all(send_e[:, None], jnp.full_like(send_e, -1, shape=(size, 1)),
                                       send_off, send_sizes, out_off, recv_sizes,
                                       axis_name=axis)[:, 0]

    def send_back(y):
        back = jax.lax.ragged_all_to_all(y, jnp.zeros_like(y, shape=(n, d)), recv_off, recv_sizes,
                                         send_off_at_source(), send_sizes, axis_name=axis)
        return back.at[where].get(mode="fill", fill_value=0)

    def send_off_at_source():
        return jax.lax.all_to_all(send_off, axis, 0, 0, tiled=True)

    return recv_x, recv_e, send_back
