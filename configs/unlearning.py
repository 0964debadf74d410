"""Output-level unlearning recovery (multiple choice / cloze; paper-method section 4).

Run (the embedded default: SmolLM2-135M-Instruct + the project's JumpReLU SAE at layer 3):
  python -m recovery_jax.main --config=configs/unlearning.py --workdir=runs/unlearning_default

Variants (``configs/unlearning.py:<variant>,key=value``):
  default  SmolLM2-135M-Instruct, the suite's JumpReLU SAE at blocks.3.hook_resid_post ("shipped"),
           the shipped benign science / geography questions in the cloze format (the model answers
           lettered questions at chance), features by the SAEBench rule on offline corpora, set
           positives to -10 on 50 features, 150 steps, lr 0.08, budget 20, modes none / encoder /
           encoder_exact, retain check, budget diagnostic, soft-suffix baseline. Site by relative
           depth: the paper's gemma-2-2b-it layer 3 resid_post is after 4 of 26 blocks (0.154);
           blocks.3.hook_resid_post is after 4 of SmolLM2's 30 (0.133), the suite's closest site
           (the next, blocks.6, is 0.233)
  paper    gemma-2-2b-it + Gemma Scope L3 16k resid_post with the paper's 50 public feature ids, the
           lettered 24-order format with the strict filter, modes none / encoder (needs
           model_path=<HF folder>, sae_path=<Gemma Scope folder>, questions=<your .jsonl/.csv, e.g.
           WMDP-bio rows in this project's question format>)
  topk12   the default with the shipped TopK SAE at blocks.12.hook_resid_pre: a named variant (a mid
           layer, TopK; NOT the paper's early layer; the figures measured before the suite existed)
  tiny     a random-weight tiny llama + random JumpReLU SAE (CI smoke test; seconds)
Further args: questions=<file>, format=mc|cloze|cloze_listed, steps=<n>, max_flips=<n>.
Any field can also be overridden with --config.<field>=<value>.
"""

import ml_collections

from recovery_jax.config_utils import parse_arg

# paper-method 4.1: the 50 clamped Gemma Scope L3 16k feature ids, in order
PAPER_FEATURE_IDS = (
    3025, 8786, 11913, 14227, 679, 10793, 1082, 8803, 6691, 9839, 616, 8934, 16064, 10238, 16169, 13219, 8396, 2659,
    11380, 3061, 8845, 7695, 13535, 570, 1676, 9870, 2411, 16239, 15638, 1820, 16218, 5587, 6989, 6958, 831, 8346,
    2555, 10860, 10999, 14593, 1508, 7331, 7514, 4930, 3844, 7190, 9421, 8700, 1705, 3204)


def get_config(arg=None):
  a = parse_arg(arg, variant="default", model_path="", sae_path="", questions="", format="", steps=0, max_flips=0)
  c = ml_collections.ConfigDict()
  c.experiment = "unlearning"
  c.variant = a.variant
  c.seed = 0

  c.model = "smollm2-135m-instruct"
  c.model_processing = ""
  c.sae = "shipped"  # the suite's SAE at this site (assets/smollm2-135m-instruct-res3-post-jumprelu)
  c.sae_override_checks = False
  c.site = "blocks.3.hook_resid_post"
  # the threat model: () = the delta at the clamp site, after the clamp (the paper); residual sites visited
  # before it (the delta passes the clamp, which re-acts) or several (cross-layer); experiments/grid.delta_sites
  c.delta_sites = ()

  c.task = ml_collections.ConfigDict()  # the questions and the prompt format they are asked in
  c.task.questions_file = ""  # "": recovery_jax/data/unlearning_questions.jsonl (128 benign facts)
  c.task.retain_file = ""  # "": recovery_jax/data/retain_questions.jsonl (40 general questions)
  c.task.format = "cloze"  # mc (the paper's lettered prompt, 24 orders), cloze, cloze_listed (24 orders)
  # the orders each question is asked in: all (every order of the format: the paper's 24 permutations for
  # mc / cloze_listed, one for cloze), both (the original and the reversed order; mc / cloze_listed), original
  c.task.orders = "all"
  c.task.strict = True  # keep a question only if the base model is correct in every order
  c.task.bos = "auto"  # auto (BOS for Gemma, as the reference), always, never
  c.task.max_questions = 0
  c.task.max_rows = 50_000  # a question file with more rows is an error (0: no cap)
  c.task.max_flips = 0  # 0: every valid flip

  c.features = ml_collections.ConfigDict()  # which SAE features are clamped: the SAEBench rule or given ids
  c.features.feature_ids = ()  # a given list replaces the SAEBench rule (the paper preset)
  c.features.retain_threshold = 0.01
  c.features.forget_sources = ("questions", "topic_glosses")
  c.features.retain_sources = ("shakespeare", "fortunes", "python_doc", "retain_questions")
  c.features.corpus_dir = ".cache/corpus"
  c.features.max_docs = 400  # per source
  c.features.seq_len = 64
  c.features.batch_size = 16

  c.clamp = ml_collections.ConfigDict()  # the defence: how the chosen SAE features are clamped at the site
  c.clamp.mode = "set"
  c.clamp.positive_only = True
  c.clamp.semantics = "frozen"
  c.clamp.error_term = "keep"

  c.recovery = ml_collections.ConfigDict()  # the recovery: a delta optimised under the budget while the clamp stays active, per mode and variant
  c.recovery.steps = 150
  c.recovery.lr = 0.08
  c.recovery.ridge = 1e-4
  # "absolute": sweep.budget bounds ||delta||_F; "relative": it is rho, the bound rho * ||h_def||_F at the
  # delta positions (the paper's relative delta norm), per problem
  c.recovery.budget_scale = "absolute"
  c.recovery.objective = "choice_margin"  # or choice_ce
  c.recovery.modes = ("none", "encoder", "encoder_exact")
  c.recovery.variants = ("per_example",)
  c.recovery.attribution_top_k = 0

  c.sweep = ml_collections.ConfigDict()  # the grid: every combination of these values is one point
  c.sweep.n_features = (50,)
  c.sweep.clamp_value = (-10.0,)  # set to -m, m = 10 (the reference script default; paper-method Q5)
  c.sweep.budget = (20.0,)
  c.sweep.seed = (0,)
  c.unit_size = 0

  c.retain_check = True  # accuracy on the retain questions under each defence vs the base model
  c.diagnostic = ml_collections.ConfigDict()  # recovery of a few flips over a range of budgets
  c.diagnostic.enabled = True
  c.diagnostic.budgets = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)
  c.diagnostic.n_flips = 6
  c.diagnostic.modes = ("none", "encoder")

  c.soft_suffix = ml_collections.ConfigDict()  # the soft-suffix baseline (optimised input embeddings)
  c.soft_suffix.enabled = True
  c.soft_suffix.variants = ("faithful", "corrected")
  c.soft_suffix.suffix_len = 16
  c.soft_suffix.steps = 300
  c.soft_suffix.lr = 5e-4
  c.soft_suffix.budget = 20.0
  c.soft_suffix.noise = 0.01
  c.soft_suffix.init_text = " !"
  c.soft_suffix.objective = "choice_ce"
  c.soft_suffix.max_flips = 32
  c.soft_suffix.batch_size = 8  # flips optimised together (independent rows)

  c.eval_batch_size = 32  # questions per batch when answers are scored
  c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
  c.plots = True
  c.progress = True
  c.tensorboard = True  # TensorBoard events under <workdir>/tensorboard (recovery_jax.telemetry)

  if a.variant == "paper":
    c.model = a.model_path or "REQUIRED: model_path=<HF folder of gemma-2-2b-it>"
    c.sae = a.sae_path or "REQUIRED: sae_path=<Gemma Scope folder, layer_3/width_16k resid_post>"
    c.task.questions_file = a.questions or "REQUIRED: questions=<.jsonl/.csv question file, e.g. WMDP-bio rows>"
    c.task.format = "mc"
    c.features.feature_ids = PAPER_FEATURE_IDS
    c.recovery.modes = ("none", "encoder")
    c.retain_check = False
  elif a.variant == "topk12":  # a mid-layer TopK variant: NOT the paper's early layer
    c.site = "blocks.12.hook_resid_pre"
  elif a.variant == "tiny":
    c.model = "tiny-random-llama"
    c.sae = "random"
    c.site = "blocks.1.hook_resid_post"
    c.task.strict = False
    c.task.max_questions = 24
    c.task.max_flips = 6
    c.features.forget_sources = ("questions",)
    c.features.retain_sources = ("retain_questions",)
    c.features.retain_threshold = 0.5
    c.features.seq_len = 24
    c.recovery.steps = 10
    c.recovery.modes = ("none", "encoder")
    c.sweep.n_features = (16,)
    c.sweep.clamp_value = (-20.0,)
    c.diagnostic.budgets = (0.0, 5.0, 20.0)
    c.diagnostic.n_flips = 2
    c.diagnostic.modes = ("encoder",)
    c.soft_suffix.steps = 5
    c.soft_suffix.suffix_len = 4
    c.soft_suffix.max_flips = 2
    c.soft_suffix.batch_size = 2
    c.soft_suffix.lr = 0.05
    c.plots = False
    c.progress = False
  elif a.variant != "default":
    raise ValueError(f"configs/unlearning.py: unknown variant {a.variant!r}; expected default, paper, topk12 or tiny")
  if a.questions and a.variant != "paper":
    c.task.questions_file = a.questions
  if a.format:
    c.task.format = a.format
  if a.steps:
    c.recovery.steps = a.steps
  if a.max_flips:
    c.task.max_flips = a.max_flips
  return c
