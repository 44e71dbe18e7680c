"""Token merging and pruning. Configured by `accel.TokenConfig`; see config.py."""
