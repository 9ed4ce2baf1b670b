"""ModelConfig: both config.json dialects, shipped configs, and validation errors."""

import json

import pytest

from dsv3_jax import ConfigError, ModelConfig
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite", "tiny"])
def test_shipped_configs_load(name):
    cfg = ModelConfig.from_json(ROOT / "configs" / f"{name}.json")
    assert cfg.qk_head_dim == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim


def test_v3_671b_numbers():
    cfg = ModelConfig.from_json(ROOT / "configs" / "deepseek-v3-671b.json")
    assert (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert cfg.num_moe_layers == 58 and cfg.num_nextn_predict_layers == 1
    # 671B main model (the report's number); the MTP module adds 11.6B of its own weights
    # (the checkpoint's 685B also counts its copies of the embedding and head, 1.85B).
    assert 670.5e9 < cfg.num_params(include_mtp=False) < 671.5e9
    assert 682e9 < cfg.num_params() < 683e9
    assert cfg.fp8_block_size == (128, 128)


def test_v2_lite_gate_defaults():
    cfg = ModelConfig.from_json(ROOT / "configs" / "deepseek-v2-lite.json")
    assert (cfg.scoring_func, cfg.topk_method, cfg.q_lora_rank) == ("softmax", "greedy", 0)
    assert 15.5e9 < cfg.num_params() < 16.0e9


def test_transformers_dialect():
    """What transformers 5.x writes: rope_parameters, num_mtp_layers, no gate fields."""
    d = {"model_type": "deepseek_v3", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
         "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "q_lora_rank": None,
         "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
         "max_position_embeddings": 64, "num_mtp_layers": 1,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "mscale": 1.0,
                             "mscale_all_dim": 1.0}}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["type"] == "yarn"
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.q_lora_rank == 0
    assert cfg.num_nextn_predict_layers == 1 and cfg.scoring_func == "sigmoid"
    # round trip through the official dialect
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def _tiny(**changes):
    d = json.loads((ROOT / "configs" / "tiny.json").read_text())
    d.update(changes)
    return d


@pytest.mark.parametrize("changes, field, words", [
    (dict(n_group=3), "n_group", "divisible"),
    (dict(topk_group=5), "topk_group", "<= n_group"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim", "even"),
    (dict(model_type="llama"), "model_type", "unknown"),
    (dict(hidden_size=0), "hidden_size", "positive"),
    (dict(scoring_func="relu"), "scoring_func", "allowed"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok", "topk_group"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace", "num_hidden_layers"),
    (dict(num_key_value_heads=2), "num_key_value_heads", "equal"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling", "YaRN"),
])
def test_bad_fields_name_field_and_value(changes, field, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(_tiny(**changes))
    msg = str(e.value)
    assert repr(field) in msg and words in msg, msg
    if field in changes:
        assert repr(changes[field]) in msg, msg


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
