"""Packed documents: segment ids through the model and the loss, the packer, train.py --pack-documents."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import ModelConfig, init_model
from dsv3_jax.data import EOS_ID, PAD_ID, DataError, TokenBatcher
from dsv3_jax.model import segment_positions
from dsv3_jax.packing import DocumentPacker, document_spans, pack_rows
from dsv3_jax.train.losses import lm_loss, weight_sums
from tests.conftest import FIXTURES

CFG = ModelConfig.from_json(FIXTURES / "v3_mtp")  # vocab 256, MTP depth 1
ROW = 17                                            # seq 16 + 1
LENGTHS = [(7, 6), (12, 5)]                         # documents (EOS included) of the two rows


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _docs(seed=0):
    rng = np.random.default_rng(seed)
    return [[list(rng.integers(3, CFG.vocab_size, n - 1)) + [EOS_ID] for n in row] for row in LENGTHS]


def _pack(docs):
    """Rows of the documents in order, segment ids 1, 2, ..., padding after them (id 0)."""
    tokens = np.full((len(docs), ROW), PAD_ID, np.int32)
    seg = np.zeros((len(docs), ROW), np.int32)
    for r, row in enumerate(docs):
        at = 0
        for i, d in enumerate(row, start=1):
            tokens[r, at:at + len(d)], seg[r, at:at + len(d)] = d, i
            at += len(d)
    return jnp.asarray(tokens), jnp.asarray(seg)


def _oracle_loss(model, docs, mtp_lambda):
    """Each document alone from position 0 (followed by filler the causal model never reads),
    CE over its own predictions only, token-weighted over all documents: the materialised
    logits and the plain formula, no segment ids."""
    flat = [d for row in docs for d in row]
    ids = np.full((len(flat), ROW), 5, np.int32)
    for i, d in enumerate(flat):
        ids[i, :len(d)] = d
    ids = jnp.asarray(ids)
    out = model.forward(ids[:, :-1], mtp=True)
    terms = []
    for k, logits in enumerate((out.logits, *out.mtp_logits)):
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, ids[:, k + 1:, None], -1)[..., 0]
        keep = np.zeros(nll.shape, np.float32)
        for i, d in enumerate(flat):
            keep[i, :max(len(d) - 1 - k, 0)] = 1  # position i predicts token i + k + 1 of d
        terms.append(jnp.sum(nll * keep) / keep.sum())
    return terms[0] + mtp_lambda * terms[1]


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=0)


@pytest.fixture(scope="module")
def packed(model):
    tokens, seg = _pack(_docs())
    f = nnx.jit(nnx.value_and_grad(lambda m, t, s: lm_loss(m, t, segment_ids=s, mtp_lambda=0.3,
                                                           balance_alpha=0.0)[0]))
    return f(model, tokens, seg)


def _flat_grads(g):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(g)}


def test_packed_loss_and_gradients_equal_the_documents_one_by_one(model, packed):
    """The loss of packed rows (main + MTP) is the token-weighted mean of the documents' own
    losses, and so are its gradients: no attention, routing or loss term crosses a document.
    (The sequence-wise balance term is per row, not per document: alpha 0 here.)"""
    ref, ref_g = nnx.jit(nnx.value_and_grad(lambda m: _oracle_loss(m, _docs(), 0.3)))(model)
    val, g = packed
    assert abs(float(val) - float(ref)) <= 1e-6 * abs(float(ref)), (float(val), float(ref))
    g, ref_g = _flat_grads(g), _flat_grads(ref_g)
    for k in ref_g:
        if np.abs(ref_g[k]).max() > 0:
            assert _rel(g[k], ref_g[k]) <= 2e-6, (k, _rel(g[k], ref_g[k]))


def test_accumulated_micro_batches_are_normalised_by_the_step(model, packed):
    """Rows split into micro-batches (as train_step with --accumulate does) keep different
    numbers of predictions; each is normalised by the step's total, so their mean loss and
    gradients equal the whole batch's."""
    tokens, seg = _pack(_docs())
    den = weight_sums(seg, None, seg.shape, 1) / 2
    f = nnx.jit(nnx.value_and_grad(lambda m, t, s: lm_loss(m, t, segment_ids=s, mtp_lambda=0.3,
                                                           balance_alpha=0.0, denominators=den)[0]))
    halves = [f(model, tokens[i:i + 1], seg[i:i + 1]) for i in range(2)]
    val = (halves[0][0] + halves[1][0]) / 2
    assert abs(float(val) - float(packed[0])) <= 1e-6 * abs(float(packed[0]))
    g0, g1, ref = _flat_grads(halves[0][1]), _flat_grads(halves[1][1]), _flat_grads(packed[1])
    for k in ref:
        if np.abs(ref[k]).max() > 0:
            assert _rel((g0[k] + g1[k]) / 2, ref[k]) <= 2e-6, k


def test_changing_one_document_leaves_the_others_logits_unchanged(model):
    docs = _docs()
    tokens, seg = _pack(docs)
    fwd = nnx.jit(lambda m, t, s: m.forward(t[:, :-1], segment_ids=s[:, :-1], mtp=True))
    base = fwd(model, tokens, seg)
    a, b = len(docs[0][0]), len(docs[0][1])  # row 0: A = [0, a), B = [a, a + b)
    other = np.asarray(tokens).copy()
    other[0, :a - 1] = (other[0, :a - 1] + 7) % (CFG.vocab_size - 3) + 3  # A's text, not its EOS
    changed = fwd(model, jnp.asarray(other), seg)
    # B (and row 1) unchanged, main and MTP; A changed
    np.testing.assert_array_equal(changed.logits[0, a:a + b], base.logits[0, a:a + b])
    np.testing.assert_array_equal(changed.mtp_logits[0][0, a:a + b - 1], base.mtp_logits[0][0, a:a + b - 1])
    np.testing.assert_array_equal(changed.logits[1], base.logits[1])
    assert not np.allclose(changed.logits[0, :a], base.logits[0, :a])
    other = np.asarray(tokens).copy()
    other[0, a:a + b - 1] = (other[0, a:a + b - 1] + 7) % (CFG.vocab_size - 3) + 3  # B's text
    changed = fwd(model, jnp.asarray(other), seg)
    np.testing.assert_array_equal(changed.logits[0, :a], base.logits[0, :a])
    # A's MTP states read the next token: the last one of A reads B's first, which the loss masks
    np.testing.assert_array_equal(changed.mtp_logits[0][0, :a - 1], base.mtp_logits[0][0, :a - 1])


def test_positions_restart_at_each_document():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    from dsv3_jax.model import default_positions
    np.testing.assert_array_equal(default_positions(seg.shape, None, seg), segment_positions(seg))
    np.testing.assert_array_equal(default_positions(seg.shape), np.broadcast_to(np.arange(8), (2, 8)))


def test_prediction_weights_mask_other_documents_padding_and_the_loss_mask():
    from dsv3_jax.train.losses import prediction_weights
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(prediction_weights(seg, None, 0), [[1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(prediction_weights(seg, None, 1), [[1, 0, 0, 0]])  # i -> i + 2
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1]])  # e.g. a prompt of two tokens: not trained on
    np.testing.assert_array_equal(prediction_weights(seg, mask, 0), [[0, 1, 0, 1, 0]])
    np.testing.assert_array_equal(prediction_weights(None, mask, 0), [[0, 1, 1, 1, 1]])
    assert prediction_weights(None, None, 0) is None


# ------------------------------------------------------------------------------ the packer

def _corpus(seed=0, docs=60, longest=70):
    rng = np.random.default_rng(seed)
    parts = [np.append(rng.integers(3, 200, n), EOS_ID) for n in rng.integers(0, longest, docs)]
    return np.concatenate(parts).astype(np.uint16)


def test_every_token_is_a_target_once_per_epoch():
    """Pieces of at most seq + 1 tokens overlapping by one: each token but a document's first
    is predicted exactly once per epoch; rows hold at most seq + 1 tokens."""
    tokens, seq = _corpus(), 16
    starts, lengths = document_spans(tokens)
    assert lengths.sum() == len(tokens) and (tokens[starts + lengths - 1] == EOS_ID).all()
    p_starts, p_lens, offsets = pack_rows(starts, lengths, seq, np.random.default_rng(0))
    targets = np.concatenate([np.arange(s + 1, s + n) for s, n in zip(p_starts, p_lens)])
    expected = np.setdiff1d(np.arange(len(tokens)), starts)
    np.testing.assert_array_equal(np.sort(targets), expected)
    per_row = np.add.reduceat(p_lens, offsets[:-1])
    assert per_row.max() <= seq + 1 and (np.diff(offsets) >= 1).all()


def test_packed_rows_hold_documents_with_segment_ids():
    tokens = _corpus()
    packer = DocumentPacker(tokens, 4, 16, seed=3)
    for _ in range(5):
        rows, seg = packer.next()
        assert rows.shape == seg.shape == (4, 17) and rows.dtype == np.int32
        for r, s in zip(rows, seg):
            n = (s > 0).sum()
            assert (s[:n] > 0).all() and (np.diff(s[:n]) >= 0).all() and s[0] == 1
            assert (s[n:] == 0).all() and (r[n:] == PAD_ID).all()
            for i in np.unique(s[:n]):  # each segment is a contiguous slice of the corpus
                piece = r[s == i]
                hits = [j for j in range(len(tokens) - len(piece) + 1)
                        if (tokens[j:j + len(piece)] == piece).all()]
                assert hits, piece
    assert 0 <= packer.padding_fraction() < 0.5


def test_packer_is_deterministic_and_resumes_exactly():
    tokens = _corpus()
    a, b = DocumentPacker(tokens, 4, 16, seed=1), DocumentPacker(tokens, 4, 16, seed=1)
    c = DocumentPacker(tokens, 4, 16, seed=2)
    first = [a.next() for _ in range(3)]
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(first, [b.next() for _ in range(3)]))
    assert not all((x[0] == y[0]).all() for x, y in zip(first, [c.next() for _ in range(3)]))
    # resume mid-epoch and across the epoch boundary: the same future batches
    n = a.batches_per_epoch
    for stop in (2, n - 1, n + 1):
        run = DocumentPacker(tokens, 4, 16, seed=5)
        for _ in range(stop):
            run.next()
        state = json.loads(json.dumps(run.state()))
        want = [run.next() for _ in range(3)]
        again = DocumentPacker(tokens, 4, 16, seed=0)
        again.restore(state)
        got = [again.next() for _ in range(3)]
        assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(want, got)), stop
    # two processes read the halves of each global batch
    halves = [DocumentPacker(tokens, 4, 16, seed=1, process_index=i, process_count=2).next()
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves]), first[0][0])
    np.testing.assert_array_equal(np.concatenate([h[1] for h in halves]), first[0][1])


def test_packer_errors_and_mixed_states():
    tokens = _corpus()
    packer, windows = DocumentPacker(tokens, 4, 16), TokenBatcher(tokens, 4, 16)
    with pytest.raises(DataError, match="read contiguous windows, not packed documents"):
        packer.restore(windows.state())
    with pytest.raises(DataError, match="packed documents .* with --pack-documents"):
        windows.restore(packer.state())
    with pytest.raises(DataError, match="seq_len=32 but this run has 16"):
        packer.restore(dict(DocumentPacker(tokens, 4, 32).state()))
    with pytest.raises(DataError, match="fewer than batch_size 1000"):
        DocumentPacker(tokens, 1000, 16)


# ------------------------------------------------------------------- train.py --pack-documents

# CI time: packed losses and gradients are checked above, meshes in test_train_loop.py
@pytest.mark.slow
def test_train_pack_documents_on_a_mesh(tmp_path):
    """A few packed steps with expert parallelism, FSDP and gradient accumulation (--mesh
    data=2,expert=4 --accumulate 2); the checkpoint holds the packer's position."""
    import email
    from dsv3_jax.checkpoint import Checkpointer
    from dsv3_jax.train.loop import RunConfig, train
    from train import parse
    assert parse(["--pack-documents"]).pack_documents and not parse([]).pack_documents
    d = json.loads((FIXTURES / "v3_mtp" / "config.json").read_text())
    d["vocab_size"] = 512
    (tmp_path / "config.json").write_text(json.dumps(d))
    lines = []
    hist = train(RunConfig(config=str(tmp_path / "config.json"), corpus=str(Path(email.__file__).parent),
                           steps=3, batch_size=16, seq_len=24, warmup_steps=1, checkpoint_every=3,
                           out=str(tmp_path / "run"), mesh="data=2,expert=4", accumulate=2,
                           pack_documents=True), log=lines.append)
    assert any("packed as documents" in line for line in lines), lines
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["pack_documents"] is True
    model = init_model(ModelConfig.from_json(tmp_path / "config.json"))
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    extra = ckpt.restore(3, model)
    ckpt.close()
    assert extra["data"]["packed"] is True and extra["data"]["position"] == 3


@pytest.mark.slow  # pipelines and segment ids each have their fast tests
def test_pipelined_forward_and_loss_take_segment_ids():
    """pipeline=2,expert=4: the stages attend within documents, and the packed loss through
    pipeline_forward (as train_step runs it) equals the single-device one."""
    import functools
    from sharding import make_mesh
    from sharding.pipeline import pipeline_forward
    cfg = CFG.replace(num_hidden_layers=4, vocab_size=512)  # 1 dense + 3 MoE: 1 before, 1 per stage
    tokens, seg = DocumentPacker(_corpus(longest=20), 8, 16, seed=0).next()
    tokens, seg = jnp.asarray(tokens), jnp.asarray(seg)
    loss = lambda m, fwd=None: lm_loss(m, tokens, segment_ids=seg, forward=fwd)
    ref, (_, ref_out) = nnx.jit(loss)(init_model(cfg, seed=0))
    mesh = make_mesh("pipeline=2,expert=4")
    model = init_model(cfg, seed=0, mesh=mesh)
    with jax.set_mesh(mesh):
        val, (_, out) = nnx.jit(lambda m: loss(m, functools.partial(pipeline_forward, m, microbatches=2)))(model)
        plain = nnx.jit(lambda m: pipeline_forward(m, tokens[:, :-1], microbatches=2, logits=False))(model)
    assert abs(float(val) - float(ref)) <= 1e-5 * abs(float(ref))
    assert _rel(out.hidden, ref_out.hidden) <= 1e-5 and _rel(out.mtp_hidden[0], ref_out.mtp_hidden[0]) <= 1e-5
    assert _rel(plain.hidden, ref_out.hidden) > 1e-3  # without segment ids: attention crosses documents
