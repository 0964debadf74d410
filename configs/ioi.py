"""IOI post-intervention recovery.

Run (the full IOI run of docs/settings/ioi.md, on the embedded default SmolLM2-135M-Instruct + the shipped SAE):
  python -m recovery_jax.main --config=configs/ioi.py --workdir=runs/ioi_default

Variants (``configs/ioi.py:<variant>,key=value``):
  default  SmolLM2-135M-Instruct, shipped TopK SAE at blocks.12.hook_resid_pre, 64 mixed prompts
  paper    GPT-2 small + gpt2-small-res-jb at blocks.4.hook_resid_pre, set positives to -5 on 64
           features, 64 BABA prompts of one template, 100 steps, lr 0.1, budget 20 (needs
           model_path=<HF gpt2 folder>,sae_path=<SAELens folder> on disk)
  sweep    the default with a grid over feature-set size, clamp value and budget
  tiny     a random-weight tiny llama + random SAE (CI smoke test; seconds)
Any field can also be overridden with --config.<field>=<value>.
"""

from recovery_jax.config_utils import parse_arg
import ml_collections



def get_config(arg=None):
  a = parse_arg(arg, variant="default", model_path="", sae_path="", n_prompts=0, steps=0, grid=False)
  c = ml_collections.ConfigDict()
  c.experiment = "ioi"
  c.variant = a.variant
  c.seed = 0

  c.model = "smollm2-135m-instruct"  # a named default, a .gguf file or a HF folder
  c.model_processing = ""  # "transformer_lens" for gpt2 + res-jb SAEs
  # a SAE folder (SAELens, Gemma Scope, sparsify, Llama Scope, dictionary_learning), or "shipped": the
  # project's SAE for this model and site (assets/smollm2-135m-instruct-res12-topk), from any directory
  c.sae = "shipped"
  c.sae_override_checks = False
  c.site = "blocks.12.hook_resid_pre"

  c.task = ml_collections.ConfigDict()  # the IOI prompts: how many, which templates and name orders
  c.task.n_prompts = 64
  c.task.prompt_type = "mixed"  # BABA, ABBA or mixed
  c.task.nb_templates = 0  # 0: all templates
  c.task.prompt_seed = 0

  c.clamp = ml_collections.ConfigDict()  # the defence: how the chosen SAE features are clamped at the site
  c.clamp.mode = "set"  # set, multiply or zero
  c.clamp.positive_only = True
  c.clamp.semantics = "frozen"
  c.clamp.error_term = "keep"  # keep: the SAE error passes (the paper); drop: the SAE as a full bottleneck
  # the threat model, where delta is added: () = the clamp site, after the clamp (the paper); or residual sites
  # visited before it (the residual entering the clamp, e.g. blocks.11.hook_resid_post for
  # blocks.12.hook_resid_pre, or an upstream layer), so delta passes the clamp, which re-acts; several: cross-layer
  c.delta_sites = ()

  c.recovery = ml_collections.ConfigDict()  # the recovery: a delta optimised under the budget while the clamp stays active, per mode and variant
  c.recovery.steps = 100
  c.recovery.lr = 0.1
  c.recovery.ridge = 1e-4
  # "absolute": sweep.budget bounds ||delta||_F; "relative": it is rho, the bound rho * ||h_def||_F at the
  # delta positions (the paper's relative delta norm), per problem
  c.recovery.budget_scale = "absolute"
  # with several relative budgets: bisection steps narrowing each per-prompt example's minimum rho (0: grid only)
  c.recovery.bisect_steps = 3
  c.recovery.modes = ("none", "encoder", "encoder_exact")
  c.recovery.variants = ("shared", "per_prompt")  # the reference shares one delta across prompts
  c.recovery.attribution_top_k = 10

  # The sweep grid: every combination is one point; static fields group points into compiled programs.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.n_features = (64,)
  c.sweep.clamp_value = (-5.0,)
  c.sweep.budget = (20.0,)
  c.sweep.seed = (0,)
  c.unit_size = 0  # points per work unit; 0: one unit per (mode, variant) group

  c.cards = 8  # feature cards of the top-N clamped features (by attribution), linked from the summary; 0: none
  c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
  c.plots = True
  c.progress = True
  c.tensorboard = True  # TensorBoard events under <workdir>/tensorboard (recovery_jax.telemetry)
  c.log_every = 25

  if a.variant == "paper":
    c.model = a.model_path or "REQUIRED: model_path=<folder with GPT-2 small config.json + safetensors>"
    c.model_processing = "transformer_lens"
    c.sae = a.sae_path or "REQUIRED: sae_path=<SAELens folder of gpt2-small-res-jb blocks.4.hook_resid_pre>"
    c.site = "blocks.4.hook_resid_pre"
    c.task.prompt_type = "BABA"
    c.task.nb_templates = 1
    c.recovery.modes = ("none", "encoder")
    c.recovery.variants = ("shared",)
  elif a.variant == "sweep":
    c.sweep.n_features = (16, 32, 64)
    c.sweep.clamp_value = (-5.0, 0.0)
    c.sweep.budget = (5.0, 20.0)
  elif a.variant == "tiny":
    c.model = "tiny-random-llama"
    c.sae = "random"
    c.site = "blocks.2.hook_resid_pre"
    c.task.n_prompts = 16
    c.recovery.steps = 20
    c.recovery.modes = ("none", "encoder")
    c.recovery.variants = ("shared",)
    c.sweep.n_features = (8,)
    c.sweep.clamp_value = (-5.0,)
    c.cards = 0  # feature cards read the stdlib corpus (~12 s); tests that check them ask for them
    c.plots = False
  elif a.variant != "default":
    raise ValueError(f"configs/ioi.py: unknown variant {a.variant!r}; expected default, paper, sweep or tiny")
  if a.grid:  # a small grid (used by the sharding and resume tests)
    c.sweep.clamp_value = (-5.0, -2.0)
    c.sweep.budget = (5.0, 20.0)
    c.unit_size = 2
  if a.n_prompts:
    c.task.n_prompts = a.n_prompts
  if a.steps:
    c.recovery.steps = a.steps
  return c
