"""Serving: the inference engine over the absorbed-MLA latent cache (engine.py) and HTTP."""
