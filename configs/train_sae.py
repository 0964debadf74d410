"""Train an SAE on a model's residual stream from offline text.

  python -m recovery_jax.main --config=configs/train_sae.py --workdir=runs/sae_smollm2
  python -m recovery_jax.main --config=configs/train_sae.py:smoke --workdir=/tmp/sae_smoke
  python -m recovery_jax.main --config=configs/train_sae.py:layer=12,k=32,d_sae=4608,tokens=1200000 ...

Variants (big_vision style ``file.py:arg=value,...``; a bare word sets that boolean key to True):
  smoke      tiny random model, byte tokenizer, stdlib docstrings, a few hundred steps (seconds)
  model      model name or path for ``load_model`` (default smollm2-135m-instruct)
  layer      hook layer L; ``site`` hook (default hook_resid_pre) -> blocks.L.<site>
  arch       topk | jumprelu | standard;  k, d_sae, lr, batch, steps, tokens (train tokens), seed
The default is the shipped SAE (assets/smollm2-135m-instruct-res12-topk), see its README.
"""

import ml_collections

from recovery_jax.config_utils import parse_arg

DEFAULTS = dict(smoke=False, model="smollm2-135m-instruct", layer=12, site="hook_resid_pre", arch="topk",
                k=64, d_sae=4608, lr=5e-4, batch=2048, steps=0, tokens=600_000, heldout=60_000, seed=0,
                epochs=3.0)


def get_config(arg=None):
  a = parse_arg(arg, **DEFAULTS)
  c = ml_collections.ConfigDict()
  c.experiment = "train_sae"
  c.seed = a.seed
  c.model = a.model
  c.hook_name = f"blocks.{a.layer}.{a.site}"
  c.prepend_bos = "auto"  # True | False | "auto" (= the model declares a BOS token)

  # text: "source=weight,..."; a source is a folder of .txt files under corpus_root (or a path);
  # missing sources of recovery_jax.data.corpus (python_doc, fortunes, wordnet, shakespeare, stdlib)
  # are built there when build_corpus (stdlib always: it needs no download)
  c.corpus = "python_doc=0.35,shakespeare=0.2,wordnet=0.15,fortunes=0.15,stdlib=0.15"
  c.corpus_root = ".cache/corpus"  # "" = <workdir>/corpus
  c.build_corpus = True  # build missing corpus sources under corpus_root (see corpus)
  c.stdlib_max_files = 0  # 0 = all
  c.heldout_frac = 0.02  # documents held out (by content hash) for evaluation
  # positions dropped: BOS/EOS/pad ids, BOS and the first text position of each window, and rows
  # whose norm exceeds outlier_factor x the forward batch's median (massive, sink-like activations)
  c.outlier_factor = 10.0
  c.seq_len = 128  # tokens per window of text the activations are harvested from
  c.forward_batch = 32  # windows per forward pass of the harvest
  c.train_tokens = a.tokens  # activations harvested for training
  c.heldout_tokens = a.heldout  # activations harvested from the held-out documents (evaluation)

  c.sae = ml_collections.ConfigDict(dict(  # the SAE and its optimiser (architecture, width, k, lr, batch, ...)
      architecture=a.arch, d_sae=a.d_sae, k=a.k, lr=a.lr, batch_size=a.batch, warmup_steps=100, decay_frac=0.3,
      aux_coeff=1 / 32, dead_tokens=500_000, l1_coeff=5.0, l0_coeff=1e-3, jumprelu_bandwidth=0.05,
      jumprelu_init_threshold=0.1, grad_clip=1.0))
  # total steps: `steps` if set, else `epochs` passes over the train store
  c.total_steps = a.steps
  c.epochs = a.epochs  # passes over the train store when total_steps is 0
  c.log_every = 50
  c.ckpt_every = 200  # checkpoint every N steps (an interrupted run resumes from the last)

  c.export = ml_collections.ConfigDict(dict(  # the SAELens folder written: export/<name>, weight dtype
      name=f"{a.model}-res{a.layer}-{a.arch}" if a.site == "hook_resid_pre" else f"{a.model}-{a.layer}-{a.site}-{a.arch}",
      dtype="float16"))
  c.progress = True

  if a.smoke:
    c.model = "tiny-random"
    c.hook_name = "blocks.1.hook_resid_pre"
    c.corpus = "stdlib=1"
    c.corpus_root = ""
    c.build_corpus = False
    c.stdlib_max_files = 60
    c.heldout_frac = 0.1
    c.seq_len = 64
    c.forward_batch = 16
    c.train_tokens = 24_000
    c.heldout_tokens = 3_000
    c.sae.update(d_sae=256, k=8, batch_size=512, warmup_steps=10, dead_tokens=20_000, lr=3e-3)
    c.total_steps = 150
    c.log_every = 25
    c.ckpt_every = 50
    c.export.name = "tiny-random-res1-topk"
    c.export.dtype = "float32"
    c.progress = False
  return c
