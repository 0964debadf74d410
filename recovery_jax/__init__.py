"""recovery_jax: post-intervention recovery of SAE-suppressed behaviour, in JAX."""

__version__ = "0.1.0"
