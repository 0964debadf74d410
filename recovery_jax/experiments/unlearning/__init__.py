"""Multiple-choice unlearning (paper-method 5): ``app`` is the setting (the grid on the shared runner);
``extras`` holds the post-hoc summary, the retain check, the budget diagnostic and the soft-suffix
baseline rows with their sections."""

from recovery_jax.experiments.unlearning.app import SETTING, Context, Forwards, Unlearning, prepare, render, run, validate
from recovery_jax.experiments.unlearning.extras import over_rows, render_extras

__all__ = ["SETTING", "Unlearning", "Context", "Forwards", "over_rows", "prepare", "render", "run", "validate", "render_extras"]
