"""The model's layers, one concept per file: norm, rope, linear, mla, mlp, moe, mtp."""
