"""dsv3-jax: DeepSeek-V3 (and V2) in JAX / Flax NNX."""

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.model import ModelOutput, Transformer, init_model
from dsv3_jax.weights import CheckpointError, load_hf, save_hf

__all__ = ["ConfigError", "CheckpointError", "ModelConfig", "ModelOutput", "Transformer",
           "init_model", "load_hf", "save_hf"]
