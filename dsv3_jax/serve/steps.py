"""The engine's jitted device programs: prefill into slots, one decode step, one speculative step.

Each is a pure function of (model weights, cache, per-slot arrays) that returns the tokens and
the updated cache; the cache (and the speculative draft state) is donated, so the buffers are
updated in place. The weights travel as the flat list of the model state's leaves: jit flattens
a list in C++, an `nnx.State` in Python (about 0.2 ms per call on CPU, a tenth of a small
model's decode step). Shapes are fixed by the engine (all `max_batch` slots per decode step;
prefills bucketed by batch, chunk length and cache window; decode steps read the cache up to a power-of-two
window past the furthest slot), so nothing recompiles per token or request.

With `history` (dsv3_jax/serve/penalties.py, donated too) a step applies the requests'
penalties before sampling, returns the penalized fp32 logits (what logprobs are computed from)
and the updated history after its other outputs; without it (the AOT compile, benchmarks) the
steps are the plain model. A prefill with `echo=True` also returns, per prompt position, the
raw model's log-softmax of the next prompt token and the top MAX_LOGPROBS alternatives.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.model import DecodeCache
from dsv3_jax.serve import cache as kv
from dsv3_jax.serve import speculative
from dsv3_jax.serve.penalties import History, penalize
from dsv3_jax.serve.sampling import SamplingArrays, sample
from dsv3_jax.serve.request import MAX_LOGPROBS
from dsv3_jax.serve.sampling import logprobs as _logprobs
from sharding.rules import constrain


@dataclasses.dataclass
class DraftState:
    """Per-slot speculative state: the drafted next token and the distribution it came from."""

    token: Int[Array, "slots"]
    q: Float[Array, "slots vocab"]

    def pinned(self) -> "DraftState":
        """Laid out like the slots (so every step sees the same input shardings)."""
        return DraftState(constrain(self.token, ("batch",)), constrain(self.q, ("batch", None)))


jax.tree_util.register_dataclass(DraftState, data_fields=["token", "q"], meta_fields=[])


def _window(cache: DecodeCache, window: int, slots: int | None = None) -> DecodeCache:
    """The first `window` positions of the first `slots` slots (all by default): a step reads
    only as far as any slot has got, and only the slots that can hold a request."""
    return jax.tree.map(lambda a: a[..., :slots, :window, :], cache)


def _cache_slots(cache: DecodeCache) -> int:
    return jax.tree.leaves(cache)[0].shape[-3]


def _lead(x, k: int):
    """The first k slots of a per-slot array (all of them when k covers it)."""
    return x if x.shape[0] == k else x[:k]


def _put_lead(full, part):
    """`full` with its first rows replaced by `part`."""
    return part if full.shape[0] == part.shape[0] else full.at[:part.shape[0]].set(part)


def _at(x: Float[Array, "b s d"], index: Int[Array, "b"]) -> Float[Array, "b 1 d"]:
    return jnp.take_along_axis(x, index[:, None, None], axis=1)


def _merge(structure, weights: list[jax.Array]):
    """The model from its (GraphDef, state treedef) and the state's leaves."""
    graphdef, treedef = structure
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))


def _rows_view(cache: DecodeCache, rows: Int[Array, "n"], window: int) -> DecodeCache:
    """Slots `rows` of the cache over positions [0, window), zero-padded past the cache's end
    (a padding row, == max_batch, reads slot 0: its results are dropped)."""
    def view(a):
        batch, time = a.shape[-3], a.shape[-2]
        a = jnp.take(a[..., :window, :], jnp.minimum(rows, batch - 1), axis=-3)
        if window > time:
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, window - time), (0, 0)])
        return a

    return jax.tree.map(view, cache)


def prefill(structure, weights, cache: DecodeCache, drafts: DraftState | None, ids: Int[Array, "n s"],
            next_ids: Int[Array, "n s"], start: Int[Array, "n"], lengths: Int[Array, "n"],
            final: Array, rows: Int[Array, "n"], sp: SamplingArrays, *, window: int,
            history: History | None = None, echo: bool = False):
    """Prefill one chunk per prompt: the `lengths[i]` tokens `ids[i]` (right-padded to s) at
    positions `start[i] + j`, attending (expanded, blockwise) over slot `rows[i]`'s cached
    prefix [0, start[i]) (`window` >= start + s: how far that view reaches; 0 when every start
    is 0), written into the slot (max_batch: a padding row, dropped); samples the token after
    each chunk, the request's first token where `final[i]`. `next_ids[i, j]` is the prompt token
    after position start + j (MTP sees it; the sampled token replaces it after a final chunk's
    last). Returns (tokens, their logits, cache, drafts) with the MTP draft of the token after
    the first for final rows when `drafts` is given."""
    model = _merge(structure, weights)
    n, s = ids.shape
    positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)
    view = _rows_view(cache, rows, window) if window else None
    hidden, entries = model.decode(ids, positions, view, prefill=True)
    last = lengths - 1
    if history is not None:
        history = history.start_prompts(rows, start == 0, ids, lengths)
    prompt_lps = _prompt_logprobs(model, hidden, next_ids) if echo else None
    logits = model.head(_at(hidden, last))[:, 0]
    if history is not None:
        logits = penalize(logits, sp, history.rows(rows))
    first = sample(logits, sp, start + lengths)
    if drafts is not None:
        after_last = final[:, None] & (jnp.arange(s)[None, :] == last[:, None])
        next_ids = jnp.where(after_last, first[:, None], next_ids)
        normed, entries.mtp = model.mtp_decode(hidden, next_ids, positions,
                                               None if view is None else view.mtp, prefill=True)
        token, q = speculative.draft(model.head(_at(normed, last))[:, 0], sp, start + lengths + 1)
        done = jnp.where(final, rows, drafts.token.shape[0])
        drafts = DraftState(drafts.token.at[done].set(token, mode="drop"),
                            drafts.q.at[done].set(q, mode="drop")).pinned()
    cache = kv.write(cache, entries, rows, positions)
    if history is None:
        return first, logits, cache, drafts
    history = history.add_rows(rows, first, final)
    return first, logits, cache, drafts, history, prompt_lps


def _prompt_logprobs(model, hidden, next_ids: Int[Array, "n s"]):
    """Per position j: the raw model's fp32 log-softmax of `next_ids[:, j]` and the top
    MAX_LOGPROBS (id, logprob) pairs: ([n, s], [n, s, k], [n, s, k])."""
    lp = jax.nn.log_softmax(model.head(hidden).astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, next_ids[..., None], axis=-1)[..., 0]
    top, ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return chosen, ids.astype(jnp.int32), top


def decode(structure, weights, cache: DecodeCache, last: Int[Array, "b"], pos: Int[Array, "b"],
           active, sp: SamplingArrays, *, window: int, history: History | None = None):
    """Feed each slot's last token at its position (all < window); returns (next token per
    slot, logits, cache, the next step's positions). The token and positions are the next
    step's `last` and `pos`, so steps can be chained on the device.

    The per-slot inputs may cover only the first k slots (k = len(last) <= the cache's slots):
    then the step computes those alone, so idle slots past them cost nothing."""
    model = _merge(structure, weights)
    k, b = last.shape[0], _cache_slots(cache)
    positions = pos[:, None]
    hidden, entries = model.decode(last[:, None], positions, _window(cache, window, k))
    logits = model.head(hidden)[:, 0]
    if history is not None:
        mine = History(_lead(history.counts, k), _lead(history.prompt, k))
        logits = penalize(logits, sp, mine)
    token = constrain(sample(logits, sp, pos + 1), ("batch",))
    rows = jnp.where(active, jnp.arange(k), b)
    out = token, logits, kv.write(cache, entries, rows, positions), constrain(pos + 1, ("batch",))
    if history is None:
        return out
    mine = mine.add(token, active)
    return (*out, History(_put_lead(history.counts, mine.counts),
                          _put_lead(history.prompt, mine.prompt)).pinned())


def speculative_decode(structure, weights, cache: DecodeCache, drafts: DraftState, last: Int[Array, "b"],
                       pos: Int[Array, "b"], active, sp: SamplingArrays, *, window: int,
                       history: History | None = None):
    """Verify each slot's draft and draft again (dsv3_jax/serve/speculative.py); positions < window.

    Returns (tokens [b, 2] for positions p + 1, p + 2; accepted [b]: the second token counts
    only when true; cache; the new drafts; the next step's `last` and `pos`). Like `decode`,
    the per-slot inputs may cover only the first k slots."""
    model = _merge(structure, weights)
    k, b = last.shape[0], _cache_slots(cache)
    all_drafts, all_history = drafts, history
    drafts = DraftState(_lead(drafts.token, k), _lead(drafts.q, k))
    if history is not None:
        history = History(_lead(history.counts, k), _lead(history.prompt, k))
    positions = pos[:, None] + jnp.arange(2, dtype=jnp.int32)
    view = _window(cache, window, k)
    hidden, entries = model.decode(jnp.stack([last, drafts.token], axis=1), positions, view)
    logits = model.head(hidden)
    if history is not None:  # the bonus token's logits follow the draft, counted as generated
        logits = jnp.stack([penalize(logits[:, 0], sp, history),
                            penalize(logits[:, 1], sp, history.add(drafts.token, active))], axis=1)
    tokens, accepted = speculative.verify(logits[:, 0], logits[:, 1], drafts.token, drafts.q, sp, pos)
    # MTP at p sees the token at p + 1, at p + 1 the one at p + 2 (garbage if rejected: its
    # cache entry is rewritten next step, which starts at p + 1)
    normed, entries.mtp = model.mtp_decode(hidden, tokens, positions, view.mtp)
    n_new = accepted.astype(jnp.int32)
    mtp_logits = model.head(_at(normed, n_new))[:, 0]
    if history is not None:
        history = history.add(tokens[:, 0], active).add(tokens[:, 1], active & accepted)
        mtp_logits = penalize(mtp_logits, sp, history)
    token, q = speculative.draft(mtp_logits, sp, pos + 2 + n_new)
    rows = jnp.where(active, jnp.arange(k), b)
    next_last = constrain(jnp.take_along_axis(tokens, n_new[:, None], axis=1)[:, 0], ("batch",))
    drafts = DraftState(_put_lead(all_drafts.token, token), _put_lead(all_drafts.q, q)).pinned()
    out = (tokens, accepted, kv.write(cache, entries, rows, positions), drafts,
           next_last, constrain(pos + 1 + n_new, ("batch",)))
    if history is None:
        return out
    history = History(_put_lead(all_history.counts, history.counts),
                      _put_lead(all_history.prompt, history.prompt))
    return (*out, logits.astype(jnp.float32), history.pinned())


_JITTED: collections.OrderedDict = collections.OrderedDict()


def jitted(graphdef, treedef):
    """(prefill, decode, speculative_decode) for one model structure (the GraphDef and the
    treedef of its state), taking the state's leaves; cache and drafts donated.

    Memoised on the structure (the GraphDef's repr names every module type, static attribute and
    config value): a new engine on a model of the same structure, e.g. with other weights,
    reuses the compiled programs."""
    key = (repr(graphdef), treedef)
    if key not in _JITTED:
        def jit(fn, donate, static=()):
            return jax.jit(functools.partial(fn, (graphdef, treedef)), donate_argnames=donate,
                           static_argnames=static)
        _JITTED[key] = (jit(prefill, ("cache", "drafts", "history"), ("window", "echo")),
                        jit(decode, ("cache", "history"), ("window",)),
                        jit(speculative_decode, ("cache", "drafts", "history"), ("window",)))
        while len(_JITTED) > 8:
            _JITTED.popitem(last=False)
    _JITTED.move_to_end(key)
    return _JITTED[key]


@functools.partial(jax.jit, static_argnames=("k",))
def token_logprobs(logits, tokens, sp: SamplingArrays, k: int = MAX_LOGPROBS):
    """`sampling.logprobs` over a step's penalized logits [b, (2,) vocab] and tokens [b, (2)]."""
    if logits.ndim == 3:
        return jax.vmap(lambda lg, t: _logprobs(lg, t, sp, k), in_axes=(1, 1), out_axes=1)(logits, tokens)
    return _logprobs(logits, tokens, sp, k)
