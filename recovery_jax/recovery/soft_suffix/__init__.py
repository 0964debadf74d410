"""OABD-style soft-suffix baselines (paper-method 9), one implementation for unlearning and refusal.

A soft suffix of L free embeddings is placed after the (defended) prompt and optimised with Adam under a
per-row budget on ||suffix - init||_F; ``faithful`` (the reference: monitor detached, behaviour alone) and
``corrected`` (a differentiable monitor term) are the two variants (``VARIANTS``).

Module map: ``core`` (layout [prompt | suffix | optional teacher-forced tail], initialisation with
per-example noise, the clipped Adam loop as one compiled program per shape, batching), ``choice``
(multiple choice: ``SuffixConfig``, ``run``, ``summarize``, ``render``), ``refusal`` (teacher-forced
answer objective and greedy generation: ``RefusalSuffixConfig``, ``run_refusal``).
"""

from recovery_jax.recovery.soft_suffix.core import VARIANTS
from recovery_jax.recovery.soft_suffix.choice import SuffixConfig, forward, render, run, summarize
from recovery_jax.recovery.soft_suffix.refusal import RefusalSuffixConfig, run_refusal

__all__ = ["VARIANTS", "SuffixConfig", "forward", "render", "run", "summarize", "RefusalSuffixConfig", "run_refusal"]
