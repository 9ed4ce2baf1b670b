"""Load a model for serving from a train.py run folder or a Hugging Face checkpoint folder.

A run folder (written by `train.py`) holds config.json, tokenizer.json and orbax checkpoints/;
the latest checkpoint is restored. A HF folder holds config.json and *.safetensors, and
optionally tokenizer.json, tokenizer_config.json (`chat_template`, `bos_token`, `eos_token`)
and chat_template.jinja. Without a tokenizer the model still serves token-id prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsv3_jax.config import ModelConfig
from dsv3_jax.serve.chat import ChatTemplate

DTYPES = ("fp32", "bf16", "fp8")


class LoadError(ValueError):
    """The path is not a loadable checkpoint folder; the message names it."""


def _token_text(value) -> str:
    """tokenizer_config.json stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _chat_template(path: Path) -> ChatTemplate | None:
    """The folder's jinja chat template (chat_template.jinja or tokenizer_config.json), if any."""
    config_file = path / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LoadError(f"{config_file} cannot be read: {e}") from None
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text()
    if not source:
        return None
    return ChatTemplate(source, bos_token=_token_text(config.get("bos_token")),
                        eos_token=_token_text(config.get("eos_token")))


def _tokenizer(path: Path):
    """tokenizers.Tokenizer from PATH/tokenizer.json, or None when the folder has none."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    import tokenizers
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception
        raise LoadError(f"tokenizer file {file} cannot be read: {e}") from None


def _load_run(path: Path, precision: str, mesh):
    """The latest checkpoint of a train.py run folder, in `precision`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax.checkpoint import Checkpointer, CheckpointRestoreError
    from dsv3_jax.model import init_model

    cfg = ModelConfig.from_json(path / "config.json")
    # Training keeps fp32 master weights: restore those, then cast for serving.
    model = init_model(cfg, precision=precision, param_dtype=jnp.float32, mesh=mesh)
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    try:
        ckpt.restore(None, model)
    except CheckpointRestoreError as e:
        raise LoadError(f"run folder {path}: {e}") from None
    finally:
        ckpt.close()
    if precision != "fp32":  # bf16 parameters, as load_hf gives (the routing bias is no Param)
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    return model


def load_for_serving(path: str | Path, *, dtype: str = "bf16", mesh=None, precision: str | None = None):
    """(model, tokenizer or None, ChatTemplate or None, model name) from a checkpoint folder.

    `dtype` ("fp32", "bf16") is the compute and parameter dtype; `precision` ("fp32", "bf16",
    "fp8") overrides it, "fp8" keeping an FP8 checkpoint's block-quantized weights as stored
    (e4m3 values + block scales). With a `mesh` (sharding.make_mesh) parameters are sharded by
    the logical-axis rules (FP8 ones at block boundaries, values and scales alike) and MoE layers
    dispatch expert-parallel.
    """
    path = Path(path).expanduser()
    precision = precision or dtype
    if precision not in DTYPES:
        raise LoadError(f"precision {precision!r} is not one of {DTYPES}")
    if not path.is_dir():
        raise LoadError(f"checkpoint {path} is not a folder")
    if not (path / "config.json").is_file():
        raise LoadError(f"checkpoint {path} has no config.json: expected a train.py run folder "
                        "(config.json, checkpoints/, tokenizer.json) or a Hugging Face folder "
                        "(config.json, *.safetensors)")
    if (path / "checkpoints").is_dir():
        model = _load_run(path, precision, mesh)
    elif any(path.glob("*.safetensors")):
        from dsv3_jax.weights import load_hf
        model = load_hf(path, precision=precision, mesh=mesh)
    else:
        raise LoadError(f"checkpoint {path} has a config.json but neither a checkpoints/ folder "
                        "(train.py run) nor *.safetensors files (Hugging Face checkpoint)")
    return model, _tokenizer(path), _chat_template(path), path.resolve().name


def use_compilation_cache(path: str | Path) -> Path:
    """Turn on JAX's persistent compilation cache in `path` for every program, however quick to
    compile (JAX's default skips those under a second: most of a small model's buckets), so a
    restarted server loads what an earlier one compiled, at start-up or on first use."""
    import jax
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
