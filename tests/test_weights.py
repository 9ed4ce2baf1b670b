"""HF checkpoint round trips and the errors a bad checkpoint must produce."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dsv3_jax import CheckpointError, ConfigError, load_hf, save_hf
from dsv3_jax.safetensors_io import CheckpointReader
from tests.conftest import FIXTURES


def _leaves(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_then_load_is_bitwise_identical(tmp_path, dtype):
    model = load_hf(FIXTURES / "v3_mtp", dtype=dtype)
    save_hf(model, tmp_path / "out", max_shard_bytes=400_000)
    again = load_hf(tmp_path / "out", dtype=dtype)
    a, b = _leaves(model), _leaves(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert a[("moe_layers", "mlp", "gate", "e_score_correction_bias")].dtype == np.float32


@pytest.mark.parametrize("case", ["v3_mtp", "v3_noqlora", "v2_group"])
def test_saved_layout_matches_the_checkpoint(tmp_path, case):
    """Same key set, shapes and dtypes as the transformers-written fixture; sharded with an index."""
    save_hf(load_hf(FIXTURES / case, dtype=jnp.float32), tmp_path, max_shard_bytes=300_000)
    ours, theirs = CheckpointReader(tmp_path), CheckpointReader(FIXTURES / case)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for k in theirs.keys():
        assert (ours.shape(k), ours.dtype(k)) == (theirs.shape(k), theirs.dtype(k)), k
        np.testing.assert_array_equal(ours.get(k), theirs.get(k), err_msg=k)
    assert (tmp_path / "model.safetensors.index.json").exists()
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == json.loads((FIXTURES / case / "config.json").read_text())["model_type"]


def test_save_over_an_older_checkpoint_removes_its_stale_shards(tmp_path):
    model = load_hf(FIXTURES / "v3_noqlora", dtype=jnp.float32)
    save_hf(model, tmp_path, max_shard_bytes=100_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    save_hf(model, tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    load_hf(tmp_path, dtype=jnp.float32)


def test_mtp_layer_can_be_skipped():
    model = load_hf(FIXTURES / "v3_mtp", dtype=jnp.float32, mtp=False)
    assert len(model.mtp) == 0 and model.cfg.num_nextn_predict_layers == 0
    ref = np.load(FIXTURES / "v3_mtp" / "reference.npz")
    np.testing.assert_allclose(model(jnp.asarray(ref["input_ids"])), ref["logits"], rtol=0, atol=1e-4)


def test_fp8_as_stored_save_is_the_checkpoint_byte_for_byte(tmp_path):
    """An FP8 checkpoint loaded as stored (precision='fp8') and saved again: the same keys, the
    same e4m3 bytes and weight_scale_inv (128-blocks with partial edge blocks), the same
    quantization_config; its other tensors in the model's bf16."""
    src = FIXTURES / "v3_fp8_b128"
    save_hf(load_hf(src, precision="fp8"), tmp_path, max_shard_bytes=200_000)
    ours, theirs = CheckpointReader(tmp_path), CheckpointReader(src)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    fp8 = 0
    for k in theirs.keys():
        a, b = np.asarray(ours.get(k)), np.asarray(theirs.get(k))
        assert a.shape == b.shape, k
        if b.dtype.itemsize == 1 or k.endswith("_scale_inv"):
            fp8 += 1
            assert a.dtype == b.dtype, k
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=k)
        elif not k.endswith("e_score_correction_bias"):
            assert a.dtype == jnp.bfloat16, k
            np.testing.assert_array_equal(a, b.astype(jnp.bfloat16), err_msg=k)
    assert fp8 >= 40
    conf = json.loads((tmp_path / "config.json").read_text())
    want = json.loads((src / "config.json").read_text())["quantization_config"]
    assert conf["quantization_config"] == want


# ---------------------------------------------------------------------------- broken checkpoints
def _rewrite(tmp_path, edit, case="v3_noqlora"):
    """Copy a single-file fixture, apply `edit(tensors)`, write it back."""
    src = FIXTURES / case
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    reader = CheckpointReader(src)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tmp_path):
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    path = _rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor.*{key}"):
        load_hf(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _rewrite(tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*mystery"):
        load_hf(path)


def test_misshaped_tensor_is_named(tmp_path):
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    path = _rewrite(tmp_path, lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(CheckpointError, match=rf"{key}.*shape \[\d+, \d+\], expected"):
        load_hf(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "v3_noqlora", path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(path)


def test_missing_shard(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "v3_mtp", path)
    (path / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00005.safetensors.*missing"):
        load_hf(path)


def test_fp8_weight_without_scale(tmp_path):
    src = FIXTURES / "v3_mtp_fp8_b16"
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if k.endswith("kv_a_proj_with_mqa.weight_scale_inv"))
    shard = path / index["weight_map"].pop(key)
    reader = CheckpointReader(src)
    tensors = {k: np.array(reader.get(k)) for k, f in index["weight_map"].items()
               if (path / f) == shard}
    save_file(tensors, str(shard))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"float8 but '{key}' is missing"):
        load_hf(path)


def test_unknown_model_type(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "v3_noqlora", path)
    conf = json.loads((path / "config.json").read_text())
    conf["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="'model_type' = 'llama': unknown"):
        load_hf(path)


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = load_hf(FIXTURES / "v3_noqlora", dtype=jnp.float32)
    save_hf(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    load_hf(tmp_path, dtype=jnp.float32)
