"""Our own attention kernels (Triton). Import lazily: Triton is an optional dependency."""
