"""Step caching across denoising steps. Configured by `accel.CacheConfig`; see config.py."""
