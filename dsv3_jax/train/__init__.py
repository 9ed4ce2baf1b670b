"""Training: losses, the auxiliary-loss-free bias update, the optimizer (the loop lands next)."""
