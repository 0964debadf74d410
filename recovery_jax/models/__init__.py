"""Decoder-only transformers as pure functions, their loaders, tokenizers and generation."""

from recovery_jax.models.config import ModelConfig
from recovery_jax.models.transformer import forward, final_logits, ForwardOutput, KVCache, init_cache, embed, unembed, default_positions
from recovery_jax.models.sites import parse_site, site_name
from recovery_jax.models.loading import load_model, NAMED_MODELS
from recovery_jax.models.processing import process_like_transformer_lens
from recovery_jax.models import chat
