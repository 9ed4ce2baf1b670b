"""Model FLOPs per token and MFU (the formula the training metrics use).

Training FLOPs per token = 6 x (matmul weights a token activates) + attention:
- activated weights: every attention projection, the dense MLPs of the first layers, per MoE
  layer the gate, the shared experts and `num_experts_per_tok` routed experts, and the output
  head (the embedding is a lookup, not a matmul); the MTP modules' blocks and eh_proj too;
- attention, per layer and token, for a causal sequence of length S: scores q.k over
  qk_head_dim and the weighted sum over v_head_dim, on average S / 2 keys, x 2 (multiply-add)
  x 3 (forward + backward): 6 x H x (S / 2) x (qk_head_dim + v_head_dim).
MFU = tokens/s x FLOPs per token / the device's peak dense FLOP/s (None where unknown).
"""

from __future__ import annotations

import jax

from dsv3_jax.config import ModelConfig

# Dense bf16 peak FLOP/s by device kind (vendor datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v4": 275e12}


def activated_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through in a forward pass (see the module docstring)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank
         else D * H * cfg.qk_head_dim)
    attn = (q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D)
    dense = 3 * D * cfg.intermediate_size
    moe = (D * cfg.n_routed_experts
           + 3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts))
    layers = cfg.num_dense_layers * (attn + dense) + cfg.num_moe_layers * (attn + moe)
    mtp = cfg.num_nextn_predict_layers * (attn + moe + 2 * D * D + D * cfg.vocab_size)
    return layers + mtp + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 6 * layers * cfg.num_attention_heads * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * activated_matmul_params(cfg) + attention


def peak_flops() -> float | None:
    """The first device's dense bf16 peak, or None when unknown (e.g. CPU)."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, num_devices: int | None = None
        ) -> float | None:
    """Model FLOPs utilisation over all devices, or None when the peak is unknown."""
    peak = peak_flops()
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak * (num_devices or jax.device_count()))
