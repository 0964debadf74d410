"""Refusal steering: refusal features, the defence, its preflight and the v4 recovery (paper-method 6).

After the preflight the app recovers the strict-valid cases of the chosen strength (``recovery.*``:
modes none/encoder/jacobian, generation variants faithful/honest, attribution replay, the defence with
its error term dropped, a budget sweep) and runs the soft-suffix baseline (``soft_suffix.*``); every
job is a resumable work unit.

Run (on the embedded default SmolLM2-135M-Instruct + the shipped TopK SAE):
  python -m recovery_jax.main --config=configs/refusal.py --workdir=runs/refusal_default

Variants (``configs/refusal.py:<variant>,key=value``):
  default  SmolLM2-135M-Instruct + the shipped TopK SAE at blocks.12.hook_resid_pre; the 8 features best
           aligned with the teacher-forced openings contrast (20 candidates) set to v whether active or
           not (``set``, the clamp form of SAELens steering), v in (3, 4, 5); 64 shipped benign prompts.
           The one SAE-feature defence found that makes SmolLM2 refuse with real refusal phrases (57/64 at
           v = 4; docs/settings/refusal.md: the search). The delta enters at blocks.11.hook_resid_post, the
           vector the clamped SAE reads, so the clamp re-acts on every perturbed state
  after    the default with the delta right after the clamp (blocks.12.hook_resid_pre; no clamp acts on it)
  threats  the default's threat models (after / before / upstream / cross) x modes: relative-budget curves
           at rho in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3) and each case's minimum rho
  suite    the paper's form on the project's JumpReLU resid_post suite: ``multiply`` x m on the global
           top 20 (site, feature) pairs over blocks.{9,12,15,18}.hook_resid_post (10 candidates per
           site), m in (3, 6, 10); on SmolLM2 its "refusals" are negative/degenerate openings only
  paper    gemma-2-2b-it + Gemma Scope resid_post SAEs (user folders) at the circuit layers, a user
           feature list ``features=L:f+L:f+...`` (``+``: the arg's items are split at commas; or
           ``--config.features.list=L:f,L:f,...``) and prompt file ``prompts=...`` (AdvBench/HarmBench
           rows), multiply x3, 128 new tokens ended by <eos> only (needs model_path, sae_path, prompts, features)
  topk12   the default's site and features with SAELens additive steering (``add``: a fixed vector, no
           SAE clamp, so no recovery), strengths (2, 3, 4), 64 new tokens
  la_ig    the default with the candidates ranked by LA-IG attribution (features.selection=la_ig)
  tiny     a random-weight tiny llama + random SAEs at blocks.{1,2}.hook_resid_post (CI; seconds)
Any field can also be overridden with --config.<field>=<value>.
"""

import ml_collections

from recovery_jax.config_utils import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, variant="default", model_path="", sae_path="", prompts="", features="", n_prompts=0)
  c = ml_collections.ConfigDict()
  c.experiment = "refusal"
  c.variant = a.variant
  c.seed = 0

  c.model = "smollm2-135m-instruct"
  # one SAE per circuit site: "shipped" (the project's SAE for model and site, by name), a folder
  # (with {site} or {layer} filled in per site), or "random" (smoke runs)
  c.sae = "shipped"
  # the circuit: the defence steers the chosen features at each of these sites, all positions
  c.sites = ("blocks.12.hook_resid_pre",)

  c.task = ml_collections.ConfigDict()  # the prompts the defence is applied to (benign instructions by default)
  c.task.prompts_file = ""  # "": the shipped benign instructions (recovery_jax/data/refusal_prompts.jsonl)
  c.task.n_prompts = 64  # the first n rows; 0: all
  c.task.max_rows = 50_000  # a prompt file with more rows is an error (0: no cap); n_prompts stops reading early
  c.task.system = ""  # "": the template's default system turn

  c.features = ml_collections.ConfigDict()  # which SAE features the defence steers: a ranking or a user list
  c.features.list = ""  # "L:f,L:f,...": a user feature list (skips the contrast)
  c.features.contrast = "openings"  # openings, system or files (harmful_file vs harmless_file, the paper's)
  c.features.contrast_file = ""  # rows for the openings/system contrast ("": the shipped file's last rows)
  c.features.harmful_file = ""
  c.features.harmless_file = ""
  c.features.n_contrast = 16
  c.features.n_candidates = 20  # per site, by decoder cosine
  c.features.vector_site = ""  # "": each site's own contrast vector; else that site's for all (paper: layer 15)
  c.features.k = 8  # global top K (site, feature) pairs
  # how the candidates are ranked: "contrast" (the score above) or "la_ig" (paper-method 6.2: LA-IG attribution,
  # the contrast direction ablated at every resid_post, 10 interpolation steps, on the contrast's refusal-side
  # prompts; tasks/refusal_la_ig.py)
  c.features.selection = "contrast"
  c.features.compare_selection = False  # also rank by the other selection; their top-K overlap in features.json

  c.defence = ml_collections.ConfigDict()  # the SAE-feature defence: clamp form, strengths, error term
  c.defence.kind = "set"  # multiply (the paper), set (active or not), add (SAELens steering)
  c.defence.strengths = (3.0, 4.0, 5.0)
  c.defence.error_term = "keep"  # keep (the paper) or drop (the SAE as a full bottleneck)

  c.generation = ml_collections.ConfigDict()  # greedy generation of the base, defended and recovered answers
  c.generation.max_new_tokens = 128
  c.generation.batch_size = 16
  # stop tokens: eos (the tokenizer's eos alone, as the paper's TL generate: a Gemma answer runs on past
  # <end_of_turn>) or eos+end_of_turn (corrected: also the template's end-of-turn token and the config's eos ids)
  c.generation.stop = "eos+end_of_turn"

  # v4 two-stage recovery on the strict-valid cases of the chosen strength (paper-method 6.4), generation
  # with the recovered delta (faithful: stage 1 only; honest: both stages), attribution, error term
  # dropped, budget sweep
  c.recovery = ml_collections.ConfigDict()
  c.recovery.enabled = True
  c.recovery.strength = 0.0  # 0: the strength with the most substring/safety-cue valid cases
  c.recovery.max_cases = 0  # 0: every valid case
  c.recovery.modes = ("none", "encoder", "jacobian")
  c.recovery.variants = ("faithful", "honest")
  # each stage's own knobs (v4strong); the optimiser knobs both stages share are set once below
  c.recovery.stage1 = ml_collections.ConfigDict({"steps": 30, "lr": 0.1, "budget": 40.0})
  c.recovery.stage2 = ml_collections.ConfigDict({"steps": 120, "lr": 0.05, "budget": 40.0})
  c.recovery.n_ans = 48
  c.recovery.jacobian_probes = 8
  c.recovery.correction_steps = 5
  c.recovery.checkpoint_every = 10
  c.recovery.discourage_safety_prefixes = True
  c.recovery.batch_size = 8  # cases per compiled recovery call (0: all at once)
  c.recovery.attribution_modes = ("jacobian",)  # recovery-path attribution replay (paper-method 9.4)
  c.recovery.attribution_top_k = 10
  c.recovery.drop_modes = ("jacobian",)  # the same recovery with defence.error_term=drop
  # "absolute": stage budgets and recovery.budgets bound ||delta||_F; "relative": they are rho, the bound
  # rho * ||h_def||_F at each stage's delta positions, per case
  c.recovery.budget_scale = "absolute"
  c.recovery.budget_mode = "jacobian"
  c.recovery.budgets = (2.0, 5.0, 10.0, 20.0, 40.0)  # both stages; () skips the sweep
  # The threat model: where the delta enters, separate from the clamp sites. () = right after each clamp (the
  # circuit sites; with several, the paper's cross-layer form). A site visited before a clamp passes through it
  # and the clamp re-acts on the perturbed state: blocks.11.hook_resid_post is the vector the SAE clamped at
  # blocks.12.hook_resid_pre reads (docs/settings/refusal.md: threat models)
  c.recovery.delta_sites = ("blocks.11.hook_resid_post",)
  c.recovery.encoder_project_params = True  # v4's encoder mode also projects the delta after each step (Q6)
  # named threat models ("name:site,site,..."), compared by the relative-budget curves below
  c.recovery.threats = ("after:blocks.12.hook_resid_pre", "before:blocks.11.hook_resid_post",
                        "upstream:blocks.8.hook_resid_post", "cross:blocks.8.hook_resid_post,blocks.12.hook_resid_pre")
  # relative-budget curves: every valid case at every rho (both stages) per threat x mode, in one program per
  # batch; then bisect_steps bisections of each case's minimum rho; rhos=() skips them
  c.recovery.curve = ml_collections.ConfigDict({"rhos": (), "modes": ("none", "encoder", "jacobian"),
                                                "threats": ("after", "before", "upstream", "cross"),
                                                "bisect_steps": 2})
  # feature-set sizes: the global top K of the ranking (budget_mode, the chosen strength), each K with its own
  # preflight; every defence padded to one K_max so all share the compiled recovery; () skips the sweep
  c.recovery.ks = (2, 4, 16)
  c.plots = True
  c.tensorboard = True  # TensorBoard events under <workdir>/tensorboard (recovery_jax.telemetry)
  # generation and recovery batches sharded over the mesh's data axis (-1: every device; model axis unused here)
  c.mesh = ml_collections.ConfigDict({"data": 1, "model": 1})
  # OABD-style soft-suffix baseline (paper-method 9.2; paper run values) on the same valid cases
  c.soft_suffix = ml_collections.ConfigDict()
  c.soft_suffix.enabled = True
  c.soft_suffix.variants = ("faithful", "corrected")
  c.soft_suffix.suffix_len = 16
  c.soft_suffix.steps = 120
  c.soft_suffix.lr = 0.01
  c.soft_suffix.budget = 40.0
  c.soft_suffix.n_ans = 48
  c.soft_suffix.n_pref = 16
  c.soft_suffix.w_pref = 3.0
  c.soft_suffix.w_anti = 0.3
  c.soft_suffix.behavior_weight = 0.9

  c.save_text = False  # write base/defended texts into preflight.jsonl (off: labels, lengths, scores)

  if a.variant in ("paper", "suite", "tiny"):  # the paper's cross-layer form: a delta after each circuit clamp
    c.recovery.delta_sites = ()
    c.recovery.threats = ()
    c.recovery.curve.threats = ()
  if a.variant == "paper":
    c.model = a.model_path or "REQUIRED: model_path=<gemma-2-2b-it HF folder>"
    c.sae = a.sae_path or "REQUIRED: sae_path=<Gemma Scope resid_post folder with {layer}>"
    c.sites = tuple(f"blocks.{l}.hook_resid_post" for l in range(26))
    c.task.prompts_file = a.prompts or "REQUIRED: prompts=<AdvBench/HarmBench JSONL or CSV>"
    c.task.n_prompts = 0
    c.features.list = (a.features.replace("+", ",") if a.features else
                       "REQUIRED: features=L:f+L:f+... (the paper's 20 pairs; or --config.features.list=L:f,L:f,...)")
    c.defence.strengths = (3.0,)
    c.generation.stop = "eos"  # the paper's refusal generation stops at <eos> only (paper-method 6.1, Q23)
    c.recovery.ks = ()  # a user feature list has no ranking to take the top K of
  elif a.variant == "suite":  # the paper's cross-layer multiply on the JumpReLU suite
    c.sites = tuple(f"blocks.{l}.hook_resid_post" for l in (9, 12, 15, 18))
    c.features.n_candidates = 10
    c.features.k = 20
    c.defence.kind = "multiply"
    c.defence.strengths = (3.0, 6.0, 10.0)
  elif a.variant == "topk12":  # SAELens additive steering at the default's site (no SAE clamp)
    c.defence.kind = "add"
    c.defence.strengths = (2.0, 3.0, 4.0)
    c.recovery.enabled = False  # additive steering has no SAE clamp to recover through
    c.soft_suffix.enabled = False
    c.generation.max_new_tokens = 64
    c.generation.batch_size = 32
  elif a.variant == "tiny":
    c.model = "tiny-random-llama"
    c.sae = "random"
    c.sites = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    c.task.n_prompts = 6
    c.features.n_contrast = 4
    c.features.n_candidates = 4
    c.features.k = 6
    c.defence.kind = "set"
    c.defence.strengths = (4.0, 8.0)
    c.generation.max_new_tokens = 8
    c.generation.batch_size = 4
    c.recovery.max_cases = 3
    c.recovery.stage1.steps, c.recovery.stage2.steps = 2, 3
    c.recovery.n_ans = 4
    c.recovery.jacobian_probes = 2
    c.recovery.correction_steps = 1
    c.recovery.checkpoint_every = 2
    c.recovery.batch_size = 2
    c.recovery.attribution_top_k = 3
    c.recovery.budgets = (2.0, 40.0)
    c.recovery.ks = (2,)  # the top 2 span both sites: the main run's program; top 3 and 4 give no valid case here
    c.recovery.threats = ("cross:blocks.1.hook_resid_post,blocks.2.hook_resid_post", "upstream:blocks.0.hook_resid_post")
    c.recovery.curve.threats = ("upstream",)
    c.recovery.curve.modes = ("jacobian",)
    c.soft_suffix.suffix_len = 2
    c.soft_suffix.steps = 2
    c.soft_suffix.n_ans = 4
    c.soft_suffix.n_pref = 2
  elif a.variant == "after":  # the delta right after the only clamp (no clamp acts on it; the earlier default)
    c.recovery.delta_sites = ("blocks.12.hook_resid_pre",)
  elif a.variant == "threats":  # the threat-model x mode table: relative-budget curves at the paper's rho grid
    c.recovery.curve.rhos = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
    c.recovery.budgets = ()
    c.recovery.ks = ()
    c.recovery.drop_modes = ()
    c.soft_suffix.enabled = False
  elif a.variant == "la_ig":  # the default's features ranked by LA-IG instead of the contrast score
    c.features.selection = "la_ig"
  elif a.variant != "default":
    raise ValueError(f"configs/refusal.py: unknown variant {a.variant!r}; expected default, after, threats, suite, "
                     "topk12, paper, la_ig or tiny")
  if a.n_prompts:
    c.task.n_prompts = a.n_prompts
  return c
