"""Sparse autoencoders: config, maths, file formats, validation and training.

Modules: ``config`` (SAEConfig), ``core`` (encode/decode/error and the sparse forms of the clamp),
``formats`` (SAELens / Gemma Scope / sparsify / Llama Scope / dictionary_learning files,
``check_compatible``), ``registry`` (the SAEs shipped in ``assets/`` by model and site), ``validate``
(load-time fit check), ``metrics``, ``harvest`` (activations from text), ``train`` (optax trainer),
``pipeline`` (the end-to-end run behind the ``train_sae`` experiment), ``cards`` (feature cards),
``testing`` (tiny model).
"""

from recovery_jax.sae.config import SAEConfig, ARCHITECTURES
from recovery_jax.sae.core import (
    encode, encode_pre, decode, forward, error, process_in,
    encode_pre_subset, encode_subset, decode_delta, encoder_columns,
)
from recovery_jax.sae.formats import (
    load_sae, load_saelens, save_saelens, load_gemmascope, save_gemmascope, load_sparsify, save_sparsify,
    load_llamascope, load_dictionary_learning, check_compatible, SAEFileError, SAECompatibilityError,
)
