"""The main job (``make demo``): a demo-size run of every setting on the embedded default
(SmolLM2-135M-Instruct + the shipped SAEs), one combined report in ``<workdir>/report.md``.

  python -m recovery_jax.main --config=configs/demo.py --workdir=runs/demo

Each setting runs in ``<workdir>/<name>`` with its own config file and the overrides below (smaller
than each setting's full run, whose command in docs/settings/<name>.md gives the full figures). Variants:
  default  IOI, refusal, unlearning and TPP at demo size (sized for <= 15 minutes on a 2-core CPU)
  tiny     the same four apps on tiny random models (CI; seconds each)
  only=a-b a subset, e.g. ``configs/demo.py:only=ioi-tpp``
"""

import ml_collections

from recovery_jax.config_utils import parse_arg

DEMO = {
    "ioi": ("configs/ioi.py", ("site=blocks.12.hook_resid_post", "task.n_prompts=24", "recovery.modes=('none', 'encoder_exact')",
                               "recovery.variants=('per_prompt',)", "cards=6")),
    "refusal": ("configs/refusal.py", ("task.n_prompts=8", "generation.max_new_tokens=32", "defence.strengths=(4.0,)",
                                       "recovery.max_cases=4", "recovery.modes=('jacobian',)", "recovery.stage1.steps=30",
                                       "recovery.stage2.steps=12", "recovery.n_ans=16", "recovery.jacobian_probes=4",
                                       "recovery.correction_steps=2", "recovery.attribution_modes=()",
                                       "recovery.drop_modes=()", "recovery.budgets=()", "recovery.ks=()",
                                       "soft_suffix.enabled=False")),
    "unlearning": ("configs/unlearning.py", ("task.max_questions=40", "task.max_flips=8", "features.max_docs=200",
                                             "recovery.modes=('none', 'encoder')", "diagnostic.enabled=False",
                                             "soft_suffix.enabled=False")),
    "tpp": ("configs/tpp.py", ("task.n_train=80", "task.n_test=40", "recovery.modes=('none', 'encoder')",
                               "sweep.n_features=(100,)", "task.tpp_ns=(2, 10, 100)")),
}
TINY = {
    "ioi": ("configs/ioi.py:tiny", ("cards=2",)),
    "refusal": ("configs/refusal.py:tiny", ()),
    "unlearning": ("configs/unlearning.py:tiny", ()),
    "tpp": ("configs/tpp.py:tiny", ()),
}
ORDER = ("ioi", "refusal", "unlearning", "tpp")


def get_config(arg=None):
  a = parse_arg(arg, variant="default", only="")
  if a.variant not in ("default", "tiny"):
    raise ValueError(f"configs/demo.py: unknown variant {a.variant!r}; expected default or tiny")
  table = TINY if a.variant == "tiny" else DEMO
  c = ml_collections.ConfigDict()
  c.experiment = "demo"
  c.variant = a.variant
  c.order = tuple(n for n in a.only.split("-") if n) or ORDER  # the settings run, in this order (only=a-b: a subset)
  c.settings = ml_collections.ConfigDict(  # per setting: its config file and the overrides applied to it
      {name: {"config": table[name][0], "overrides": table[name][1]} for name in ORDER})
  return c
