"""Multi-GPU parallelism on torch.distributed (not yet implemented)."""
