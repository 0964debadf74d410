"""Sparse autoencoders: config, maths, file formats, validation and training."""

from recovery_jax.sae.config import SAEConfig, ARCHITECTURES
from recovery_jax.sae.core import (
    encode, encode_pre, decode, forward, error, process_in,
    encode_pre_subset, encode_subset, decode_delta, encoder_columns,
)
