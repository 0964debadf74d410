"""Refusal steering: refusal features, the defence, its preflight and the v4 recovery (paper-method 6).

Modules: ``app`` (validate, load, features, preflight at every strength: ``prepare``; the ``Refusal``
setting whose work units the shared runner drives),
``preflight`` (batched greedy generation and the detector labels), ``jobs`` (one recovery work unit:
two-stage recovery, generation with the delta, attribution, the soft-suffix baseline), ``results``
(rows, tables, plots, re-rendering a finished run from its stored units).

Setup: load the model and one SAE per circuit site (``blocks.L.hook_resid_post``) -> instructions
(``task.prompts_file``; the shipped benign file by default) in the model's chat template -> refusal
features (``tasks.refusal_features``: a contrast vector per site, candidates by decoder cosine, a
ranking, the global top K; or a user list) -> for every defence value: batched greedy generation
(KV cache, the defence live at every step) base and defended -> the detectors (``tasks.refusal_judge``)
-> strict validity ``not R(base) and not S(base) and R_eff(defended)``, split by the R_eff rule that
fired.

Recovery (``recovery.enabled``; multiply/set defences): at the chosen strength (``recovery.strength``,
or the one with the most substring/safety-cue valid cases), the strict-valid cases with a non-empty
base answer get the v4 two-stage recovery (``tasks.refusal_recovery``; batched, one program per stage
and mode) for every ``recovery.modes`` projection; then greedy generation with the recovered delta under
the live defence, ``faithful`` (stage-1 anchor delta only) and ``honest`` (both stages at absolute
positions), and the detectors on the recovered text. Further work units: the recovery-path attribution
replay of the stage-1 delta (``attribution_modes``), the same recovery with ``error_term=drop`` (with
its own preflight), a budget sweep (both stage budgets = b) and a feature-set-size sweep (``recovery.ks``:
the global top K of the ranking, each K with its own preflight). Every recovery call of a run shares
one set of shapes (``refusal_recovery.StageShapes``: chunk size, length and suffixes of all cases) and
pads every defence to one K_max, so budgets, feature sets and case sets are traced values of one
compiled program per stage and static structure. Every job is one resumable work unit
(``workdir/units``, orbax): a rerun with the same config recomputes the preflight but no finished
unit. Diverged recoveries (non-finite objective or delta) are flagged, never counted as recovered.

Outputs in the workdir: ``config.json``, ``features.json`` (sites, candidates, scores, the chosen set),
``preflight.jsonl`` (one row per (value, prompt): labels, rule, opening category, lengths; the texts
only with ``save_text``), ``preflight.md`` (the valid count per value, split by rule),
``recovery.jsonl`` (one row per (job, case): labels, drifts, norms; texts only with ``save_text``),
``recovery.json`` / ``recovery.md`` (tables), ``recovery_vs_budget.png``, ``recovery_vs_k.png``,
``recovery_vs_drift.png`` (stage-2 objective vs drift per mode), ``summary.md`` and
``summary.jsonl`` (one row per run x mode x variant).
"""

# The app's entry points and what tests and notebooks reach for; each module's own names stay there.
from recovery_jax.experiments.refusal.app import SETTING, Refusal, prepare, run, validate
from recovery_jax.experiments.refusal.jobs import (ATTR_COMPONENTS, LABELS, VARIANTS, RecoveryContext, choose_strength,
                                                   compute_job, recovery_jobs)
from recovery_jax.experiments.refusal.preflight import generate_answers, generate_rows
from recovery_jax.experiments.refusal.results import _job_name, case_rows, render, render_finished, summary_rows

__all__ = ["SETTING", "Refusal", "prepare", "run", "validate", "ATTR_COMPONENTS", "LABELS", "VARIANTS", "RecoveryContext", "choose_strength",
           "compute_job", "recovery_jobs", "generate_answers", "generate_rows", "case_rows", "_job_name",
           "render", "render_finished", "summary_rows"]
