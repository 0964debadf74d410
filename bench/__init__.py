"""Benchmarks of recovery_jax (throughput, hardware utilisation). Never imported by the library."""
