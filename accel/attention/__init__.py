"""Sparse attention processor and backends. Configured by `accel.AttentionConfig`; see config.py."""
