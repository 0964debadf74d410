"""Text data: offline corpus building and document/token streaming."""

from recovery_jax.data.corpus import (
    build_corpus, list_text_files, iter_documents, split_documents, is_heldout, stdlib_docstrings,
)
