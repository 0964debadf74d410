"""TPP latent-level recovery (targeted probe perturbation as a defence).

Run (the embedded default: SmolLM2-135M-Instruct + the suite's JumpReLU SAE at blocks.6.hook_resid_post,
five topic classes from the offline corpora):
  python -m recovery_jax.main --config=configs/tpp.py --workdir=runs/tpp_default

Variants (``configs/tpp.py:<variant>,key=value``):
  default  SmolLM2-135M-Instruct, the suite's JumpReLU SAE at blocks.6.hook_resid_post, classes
           python_doc / stdlib / shakespeare / fortunes / wordnet. Site by relative depth: the paper's
           Gemma 2 2B layer 5 resid_post is after 6 of 26 blocks (0.231); blocks.6.hook_resid_post is
           after 7 of SmolLM2's 30 blocks (0.233), the closest of the suite's sites (3, 6, 9, ...)
  topk12   the default with the shipped TopK SAE at blocks.12.hook_resid_pre (a named variant: a mid
           layer, TopK; the figures measured before the suite existed)
  paper    Gemma 2 2B + Gemma Scope layer_5/width_16k at blocks.5.hook_resid_post on a SAEBench-format
           file (bias_in_bios set 1 professions by default; needs model_path=, sae_path=, data_file=);
           N = 500, 4000 train + 1000 test contexts per class
  tiny     a random-weight tiny llama + random SAE (CI smoke test; seconds)
Any field can also be overridden with --config.<field>=<value>.
"""

from recovery_jax.config_utils import parse_arg
import ml_collections


def get_config(arg=None):
  a = parse_arg(arg, variant="default", model_path="", sae_path="", data_file="", n_train=0, n_test=0, steps=0)
  c = ml_collections.ConfigDict()
  c.experiment = "tpp"
  c.variant = a.variant
  c.seed = 0

  c.model = "smollm2-135m-instruct"
  c.sae = "shipped"  # the project's SAE for this model and site (sae.registry), or a SAE folder
  c.sae_override_checks = False
  c.site = "blocks.6.hook_resid_post"
  # the threat model: after (delta added to the defended residual, the paper) or before (to the residual the
  # clamp reads, so the ablation re-acts on h + delta); the probe path has no layers to put it further upstream
  c.threat = "after"

  c.task = ml_collections.ConfigDict()  # the TPP task: classes, contexts and the linear probes
  c.task.source = "corpus"  # corpus: one class per offline corpus folder; file: a SAEBench-format file
  c.task.corpus_root = ".cache/corpus"  # relative: from the working directory, else the repository root
  c.task.classes = ("python_doc", "stdlib", "shakespeare", "fortunes", "wordnet")
  c.task.targets = ()  # target classes of the recovery (): all
  c.task.data_file = ""  # source=file: .jsonl / .json / .csv rows
  c.task.text_field = "text"
  c.task.label_field = "label"
  c.task.label_names = ""  # "bias_in_bios": integer labels name professions
  c.task.context_len = 128
  c.task.n_train = 400
  c.task.n_test = 100
  c.task.seed = 0
  c.task.probe_l1 = 1e-3
  c.task.probe_lr = 1e-3
  c.task.probe_epochs = 20
  c.task.probe_batch = 16
  c.task.tpp_ns = (2, 5, 10, 20, 50, 100, 500)
  # drift / reactivation entries: "delta" (the delta columns: with the last-position scope nothing else
  # changes, so other positions only add never-reactivated eligible entries) or "pooled" (every pooled
  # position, paper-method Q3; costly for TopK SAEs: a full encode of every position per step)
  c.task.monitor = "delta"
  c.task.activation_batch = 32
  c.task.recover_chunk = 128  # problems per compiled recovery call (0: all at once)

  c.recovery = ml_collections.ConfigDict()  # the recovery: a delta optimised under the budget while the clamp stays active, per mode and variant
  c.recovery.steps = 100
  c.recovery.lr = 0.1
  c.recovery.ridge = 1e-4
  # "absolute": sweep.budget bounds ||delta||_F; "relative": it is rho, the bound rho * ||h_def||_F at the
  # delta positions (the paper's relative delta norm), per problem
  c.recovery.budget_scale = "absolute"
  c.recovery.modes = ("none", "encoder", "encoder_exact")
  c.recovery.variants = ("last",)  # delta scope: last non-pad position, or "all" (one row broadcast)

  c.sweep = ml_collections.ConfigDict()  # the grid: every combination of these values is one point
  c.sweep.n_features = (500,)  # N latents ablated per class (paper: 500, the scan-best threshold)
  c.sweep.budget = (20.0,)
  c.sweep.seed = (0,)
  c.unit_size = 0

  c.mesh = ml_collections.ConfigDict({"data": 1, "model": 1})
  c.plots = True
  c.progress = True
  c.tensorboard = True  # TensorBoard events under <workdir>/tensorboard (recovery_jax.telemetry)

  if a.variant == "topk12":
    c.site = "blocks.12.hook_resid_pre"
  elif a.variant == "paper":
    c.model = a.model_path or "REQUIRED: model_path=<folder with Gemma 2 2B config.json + safetensors>"
    c.sae = a.sae_path or "REQUIRED: sae_path=<Gemma Scope layer_5/width_16k/canonical folder>"
    c.site = "blocks.5.hook_resid_post"
    c.task.source = "file"
    c.task.data_file = a.data_file or "REQUIRED: data_file=<bias_in_bios set1 rows (.jsonl/.csv)>"
    c.task.text_field = "hard_text"
    c.task.label_field = "profession"
    c.task.label_names = "bias_in_bios"
    c.task.classes = ("accountant", "architect", "attorney", "dentist", "filmmaker")
    c.task.n_train = 4000
    c.task.n_test = 1000
    c.recovery.modes = ("none", "encoder")
  elif a.variant == "tiny":
    c.model = "tiny-random-llama"
    c.sae = "random"
    c.site = "blocks.2.hook_resid_post"
    c.task.classes = ("python_doc", "stdlib", "shakespeare")
    c.task.context_len = 32
    c.task.n_train = 24
    c.task.n_test = 8
    c.task.probe_epochs = 10
    c.task.probe_lr = 1e-2
    c.task.tpp_ns = (2, 10, 50)
    c.task.recover_chunk = 0
    c.recovery.steps = 20
    c.recovery.modes = ("none", "encoder")
    c.sweep.n_features = (50,)
    c.plots = False
  elif a.variant != "default":
    raise ValueError(f"configs/tpp.py: unknown variant {a.variant!r}; expected default, topk12, paper or tiny")
  if a.data_file:
    c.task.data_file = a.data_file
  if a.n_train:
    c.task.n_train = a.n_train
  if a.n_test:
    c.task.n_test = a.n_test
  if a.steps:
    c.recovery.steps = a.steps
  return c
