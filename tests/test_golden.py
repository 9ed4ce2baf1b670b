"""Our logits against transformers' on the committed fixtures (tests/fixtures/make_fixtures.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import load_hf
from dsv3_jax.safetensors_io import CheckpointReader, SafetensorsFile
from dsv3_jax.weights import key_map
from tests.conftest import FIXTURES

CASES = ["v3_mtp", "v3_noqlora", "v2_greedy", "v2_group", "v3_mtp_fp8_b16", "v3_fp8_b128"]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = load_hf(FIXTURES / case, dtype=jnp.float32)
        return cache[case]
    return get


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, loaded):
    ref = np.load(FIXTURES / case / "reference.npz")
    model = loaded(case)
    forward = nnx.jit(lambda m, ids: m.forward(ids, mtp="mtp_logits" in ref))
    out = forward(model, jnp.asarray(ref["input_ids"]))
    assert _rel(out.logits, ref["logits"]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out.logits).argmax(-1), ref["logits"].argmax(-1))
    if "mtp_logits" in ref:
        assert _rel(out.mtp_logits[0], ref["mtp_logits"]) <= 1e-5
        np.testing.assert_array_equal(np.asarray(out.mtp_logits[0]).argmax(-1),
                                      ref["mtp_logits"].argmax(-1))


@pytest.mark.parametrize("case", ["v3_mtp_fp8_b16", "v3_fp8_b128"])
def test_fp8_checkpoints_load_to_exactly_the_dequantized_weights(case, loaded):
    model = loaded(case)
    deq = SafetensorsFile(FIXTURES / case / "dequantized.safetensors").get
    reader = CheckpointReader(FIXTURES / case)
    params = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    checked = 0
    for e in key_map(model.cfg):
        if reader.dtype(e.hf_key).name != "float8_e4m3fn":
            continue
        ours = params[e.path][e.index] if e.index else params[e.path]
        if e.n_in:
            ours = ours.reshape(int(np.prod(ours.shape[:e.n_in])), -1).T
        np.testing.assert_array_equal(ours, np.asarray(deq(e.hf_key)), err_msg=e.hf_key)
        checked += 1
    assert checked >= 20
