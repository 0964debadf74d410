"""Post-intervention recovery: objectives, projections, the optimiser, the batched engine,
single-site entry points and recovery-path attribution.

Module map: ``objectives`` (objectives and drift penalties), ``projections`` (encoder and Jacobian
projections), ``optimizer`` (RecoveryConfig, the optax chain, the scanned loop, checkpoints),
``engine`` (RecoverySpec / Problem, prefix caching, batched jitted entry points), ``probe`` (the
TPP probe path),
``api`` (recover_site / recover_site_grid), ``attribution`` (decompose, replay, knockout).
"""

from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig, HParams
from recovery_jax.recovery.engine import (
    RecoverySpec, Problem, RecoveryOutput, recover, recover_examples, recover_grid, evaluate, suffix_len_for,
)
from recovery_jax.recovery.probe import ProbeSpec, ProbeProblem, recover_probe, recover_probe_examples
from recovery_jax.recovery.api import recover_site, recover_site_grid, site_problems
