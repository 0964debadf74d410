"""Post-intervention recovery: objectives, projections, the optimiser, the batched engine and
recovery-path attribution."""

from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig, HParams
from recovery_jax.recovery.engine import (
    RecoverySpec, Problem, RecoveryOutput, recover, recover_examples, recover_grid, evaluate,
    ProbeSpec, ProbeProblem, recover_probe, recover_probe_examples,
)
