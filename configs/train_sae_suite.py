"""The JumpReLU SAE suite for SmolLM2-135M-Instruct: one SAE per ``blocks.L.hook_resid_post``, all
sites harvested in one truncated forward pass and all SAEs trained in one vmapped program.

  python -m recovery_jax.main --config=configs/train_sae_suite.py --workdir=runs/sae_suite
  python -m recovery_jax.main --config=configs/train_sae_suite.py:pilot --workdir=runs/sae_pilot
  python -m recovery_jax.main --config=configs/train_sae_suite.py:layers=3-6-9,tokens=300000 ...

Arguments (``file.py:key=value,...``; a bare word sets that boolean to True):
  pilot      layers 3 and 12, 160k train tokens, 4 epochs: the ~20-minute CPU check of the recipe
  smoke      tiny random model, two sites, byte tokenizer, stdlib text (seconds; tests)
  layers     dash-separated layers (default 3-6-9-12-15-18-21-24)
  l0_coeff   JumpReLU L0 coefficient (inputs scaled to mean norm sqrt(d_in)); init_l0 the mean L0
             the initial thresholds give (init_l0=0: every threshold starts at init_threshold, e.g.
             0.001 as Gemma Scope); freeze: steps without threshold updates (decoder warm-up);
  enc_scale  "lsq" (default): the tied encoder scaled so the initial reconstruction is least-squares
             sized (without it L0 collapses to 10-13 in the first 100 steps); "none": plain W_dec^T
  thr_lr     the thresholds' learning rate as a multiple of lr (default 10: at lr they can move only
             ~lr a step, too slow to follow the L0 penalty within a few hundred steps)
  l0_target  mean training L0 the L0 coefficient is steered to after its warmup (0: off; l0_coeff
             is then the fixed coefficient, otherwise its starting value)
             d_sae, lr, batch, tokens, heldout, epochs, seed
Exports go to ``export/smollm2-135m-instruct-res{L}-post-jumprelu`` (copy them to ``assets/``).
"""

import ml_collections

from recovery_jax.config_utils import parse_arg

SUITE_LAYERS = (3, 6, 9, 12, 15, 18, 21, 24)
DEFAULTS = dict(pilot=False, smoke=False, model="smollm2-135m-instruct", layers="-".join(map(str, SUITE_LAYERS)),
                d_sae=4608, l0_coeff=0.4, init_l0=64.0, bandwidth=0.05, lr=5e-4, batch=2048, tokens=600_000,
                heldout=60_000, epochs=3.0, seed=0, dtype="float16", freeze=0, init_threshold=0.1,
                enc_scale="lsq", thr_lr=10.0, l0_target=56.0)


def export_name(model: str, layer: int) -> str:
  return f"{model}-res{layer}-post-jumprelu"


def get_config(arg=None):
  a = parse_arg(arg, **DEFAULTS)
  if a.pilot:
    a.update(layers="3-12", tokens=160_000, heldout=20_000, epochs=4.0)
  layers = [int(x) for x in a.layers.split("-") if x]
  c = ml_collections.ConfigDict()
  c.experiment = "train_sae"
  c.seed = a.seed
  c.model = a.model
  c.hook_name = ""  # several sites: hook_names
  c.hook_names = tuple(f"blocks.{L}.hook_resid_post" for L in layers)  # one SAE per site, trained together
  c.prepend_bos = "auto"
  c.corpus = "python_doc=0.35,shakespeare=0.2,wordnet=0.15,fortunes=0.15,stdlib=0.15"
  c.corpus_root = ".cache/corpus"
  c.build_corpus = True
  c.stdlib_max_files = 0
  c.heldout_frac = 0.02
  c.outlier_factor = 10.0
  c.seq_len = 128
  c.forward_batch = 32
  c.store_dtype = "float16"  # dtype of the harvested activation store
  c.train_tokens = a.tokens
  c.heldout_tokens = a.heldout
  c.sae = ml_collections.ConfigDict(dict(
      architecture="jumprelu", d_sae=a.d_sae, k=64, lr=a.lr, batch_size=a.batch, warmup_steps=50, decay_frac=0.3,
      l0_coeff=a.l0_coeff, sparsity_warmup_steps=100, jumprelu_bandwidth=a.bandwidth, jumprelu_init_l0=a.init_l0,
      jumprelu_init_threshold=a.init_threshold, jumprelu_freeze_steps=a.freeze, encoder_init_scale=a.enc_scale,
      threshold_lr_scale=a.thr_lr, l0_target=a.l0_target, dead_tokens=500_000, grad_clip=1.0))
  c.site_sparsity_coeffs = ()  # one L0 coefficient per site (same order as hook_names); () = sae.l0_coeff
  c.site_axis = "auto"  # "vmap" | "map" | "auto" (map on CPU, vmap on accelerators)
  c.total_steps = 0
  c.epochs = a.epochs
  c.log_every = 25
  c.ckpt_every = 100
  c.export = ml_collections.ConfigDict(dict(
      name="", names=tuple(export_name(a.model, L) for L in layers), dtype=a.dtype))
  c.progress = True

  if a.smoke:
    c.model = "tiny-random"
    c.hook_names = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    c.corpus, c.corpus_root, c.build_corpus, c.stdlib_max_files = "stdlib=1", "", False, 25
    c.heldout_frac, c.seq_len, c.forward_batch = 0.1, 64, 16
    c.train_tokens, c.heldout_tokens = 8_000, 1_500
    c.sae.update(d_sae=192, batch_size=256, warmup_steps=5, sparsity_warmup_steps=10, dead_tokens=4_000, lr=3e-3,
                 l0_coeff=0.05, jumprelu_init_l0=16.0)
    c.total_steps, c.log_every, c.ckpt_every = 60, 10, 20
    c.export.names = tuple(f"tiny-random-res{L}-post-jumprelu" for L in (0, 1))
    c.export.dtype = "float32"
    c.progress = False
  return c
