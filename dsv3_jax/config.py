"""ModelConfig: the Hugging Face `config.json` fields of DeepSeek-V2/V3, validated.

One config type reads our `configs/*.json` and real checkpoints alike. Two dialects load:
the official DeepSeek one (`rope_theta` + `rope_scaling: {"type": "yarn", ...}`, explicit
`scoring_func`/`topk_method`, `num_nextn_predict_layers`) and the one transformers 5.x writes
(`rope_parameters: {"rope_type": "yarn", "rope_theta": ...}`, `num_mtp_layers`, gate implied
by `model_type`). `to_dict()` writes the official dialect, which transformers also reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field has a value the model cannot use; the message names the field."""


# model_type -> (scoring_func, topk_method) when the config does not say.
_GATE_DEFAULTS = {
    "deepseek_v3": ("sigmoid", "noaux_tc"),
    "deepseek_v2": ("softmax", "greedy"),
}
_SCORING_FUNCS = ("sigmoid", "softmax")
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "attention_factor", "truncate")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3 architecture; field names are the HF `config.json` names (SPEC section 1)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    q_lora_rank: int = 1536  # 0 means a single q_proj (HF writes null)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor": ..., ...} or None
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    model_type: str = "deepseek_v3"
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    quantization_config: dict | None = None

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        """The checkpoint's FP8 weight block [rows, cols], or None when not FP8-quantized."""
        q = self.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return None
        return tuple(q.get("weight_block_size", (128, 128)))

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Fail with a message naming the field, its value and what is allowed."""

        def fail(field: str, why: str):
            raise ConfigError(f"config field {field!r} = {getattr(self, field)!r}: {why}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                  "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f, "must be a positive integer")
        for f in ("q_lora_rank", "n_shared_experts", "first_k_dense_replace",
                  "num_nextn_predict_layers"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f, "must be a non-negative integer")
        if self.model_type not in _GATE_DEFAULTS:
            fail("model_type", f"unknown; supported: {sorted(_GATE_DEFAULTS)}")
        if self.scoring_func not in _SCORING_FUNCS:
            fail("scoring_func", f"allowed: {_SCORING_FUNCS}")
        if self.topk_method not in _TOPK_METHODS:
            fail("topk_method", f"allowed: {_TOPK_METHODS}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            fail("topk_method", "'noaux_tc' (bias-corrected choice) needs scoring_func 'sigmoid'")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace",
                 f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dims)")
        if self.n_routed_experts % self.n_group:
            fail("n_group", f"n_routed_experts ({self.n_routed_experts}) must be divisible by it")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            fail("num_experts_per_tok",
                 f"must be <= topk_group * experts per group ({self.topk_group} * {per_group})")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            fail("n_group", "noaux_tc group scores sum the top-2 experts of a group: "
                 "each group needs >= 2 experts")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ("yarn",):
                fail("rope_scaling", "only YaRN scaling ({'type': 'yarn', ...}) or null is supported")
            for k in ("factor", "original_max_position_embeddings"):
                if not isinstance(self.rope_scaling.get(k), (int, float)) or self.rope_scaling[k] <= 0:
                    fail("rope_scaling", f"needs a positive {k!r}")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "DeepSeek models have an untied lm_head; only false is supported")
        if self.fp8_block_size is not None:
            b = self.fp8_block_size
            if len(b) != 2 or any(not isinstance(v, int) or v <= 0 for v in b):
                fail("quantization_config", "weight_block_size must be two positive integers")

    # ----------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict in either dialect; unknown keys are ignored."""
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in _GATE_DEFAULTS:
            raise ConfigError(f"config field 'model_type' = {model_type!r}: unknown; "
                              f"supported: {sorted(_GATE_DEFAULTS)}")
        scoring, topk_method = _GATE_DEFAULTS[model_type]
        d.setdefault("scoring_func", scoring)
        d.setdefault("topk_method", topk_method)
        if model_type == "deepseek_v2":
            d.setdefault("n_group", d.get("n_group") or 1)
            d.setdefault("topk_group", d.get("topk_group") or 1)
            d.setdefault("first_k_dense_replace", 0)
            d.setdefault("norm_topk_prob", False)
            d.setdefault("routed_scaling_factor", 1.0)
        for k in ("n_group", "topk_group"):
            if d.get(k) is None:
                d[k] = 1
        if d.get("q_lora_rank") is None:
            d["q_lora_rank"] = 0
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if d.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"config field 'moe_layer_freq' = {d['moe_layer_freq']!r}: "
                              "only 1 (every layer after first_k_dense_replace is MoE) is supported")
        if d.get("rope_interleave", True) is False:
            raise ConfigError("config field 'rope_interleave' = False: DeepSeek checkpoints rotate "
                              "adjacent (2i, 2i+1) pairs; only true is supported")
        if d.get("attention_bias"):
            raise ConfigError("config field 'attention_bias' = True: DeepSeek MLA has no biases")
        nkv = d.get("num_key_value_heads")
        if nkv is not None and nkv != d.get("num_attention_heads", nkv):
            raise ConfigError(f"config field 'num_key_value_heads' = {nkv!r}: MLA needs it equal to "
                              f"num_attention_heads ({d.get('num_attention_heads')})")
        # transformers 5.x dialect: rope_parameters holds theta and the scaling.
        rp = d.pop("rope_parameters", None)
        if rp is not None and "rope_scaling" not in d:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                d["rope_scaling"] = {"type": kind, **{k: rp[k] for k in _ROPE_KEYS if k in rp}}
        rs = d.get("rope_scaling")
        if rs is not None:
            rs = dict(rs)
            rs["type"] = rs.pop("rope_type", rs.get("type"))
            d["rope_scaling"] = rs
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for k in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if k in kwargs and isinstance(kwargs[k], int):
                kwargs[k] = float(kwargs[k])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json file, or the config.json inside a checkpoint folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The official-dialect config.json dict (also read by transformers)."""
        d = dataclasses.asdict(self)
        d["q_lora_rank"] = self.q_lora_rank or None
        d["num_key_value_heads"] = self.num_attention_heads
        d["moe_layer_freq"] = 1
        d["attention_bias"] = False
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                              else "DeepseekV2ForCausalLM"]
        if self.quantization_config is None:
            d.pop("quantization_config")
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- summaries
    def num_params(self, include_mtp: bool = True) -> int:
        """Parameter count (embedding and head included)."""
        D, H = self.hidden_size, self.num_attention_heads
        q = (D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
             if self.q_lora_rank else D * H * self.qk_head_dim)
        attn = (q + D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
                + H * self.v_head_dim * D)
        dense = 3 * D * self.intermediate_size
        moe = (3 * D * self.moe_intermediate_size * (self.n_routed_experts + self.n_shared_experts)
               + D * self.n_routed_experts + self.n_routed_experts)
        per = attn + 2 * D
        total = (self.num_dense_layers * (per + dense) + self.num_moe_layers * (per + moe)
                 + 2 * self.vocab_size * D + D)
        if include_mtp:
            total += self.num_nextn_predict_layers * (per + moe + 2 * D * D + 3 * D)
        return total

    def yarn_mscale(self) -> float:
        """Softmax-scale multiplier from YaRN: 0.1 * mscale_all_dim * ln(factor) + 1 (1 if off)."""
        rs = self.rope_scaling
        if not rs or not rs.get("mscale_all_dim"):
            return 1.0
        factor = rs["factor"]
        return 1.0 if factor <= 1 else 0.1 * rs["mscale_all_dim"] * math.log(factor) + 1.0
