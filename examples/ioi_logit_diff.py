"""(a) Your own HF model folder and SAELens SAE folder, IOI-style logit difference.

  python examples/ioi_logit_diff.py --model path/to/hf_model --sae path/to/saelens_sae \
      --site blocks.4.hook_resid_pre --n_prompts 32 --k 32 --value -5 --steps 100

IOI prompts ("Then, Mary and John went to the store. John gave a book to") are generated for the model's
tokenizer (names that are single tokens); the behaviour is logit[IO] - logit[S] at the last token. The
defence sets the top-k features by attribution to ``--value`` (the paper's IOI defence); recovery looks for
a delta at the clamp site, projected away from the clamped features' encoder directions. Prints one verdict
per prompt and returns them from ``main``.
"""

from __future__ import annotations

import argparse
import sys

import recovery_jax as rj


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="HF folder (config.json, safetensors, tokenizer.json) or .gguf")
  p.add_argument("--sae", required=True, help="SAELens folder (cfg.json + sae_weights.safetensors)")
  p.add_argument("--site", default="", help="clamp site, e.g. blocks.4.hook_resid_pre (default: the SAE's hook_name)")
  p.add_argument("--processing", default="", help="'transformer_lens' for GPT-2 with TL-trained SAEs")
  p.add_argument("--seed", type=int, default=0, help="IOI prompt seed")
  p.add_argument("--n_prompts", type=int, default=32)
  p.add_argument("--k", type=int, default=32, help="features clamped (top-k by attribution)")
  p.add_argument("--value", type=float, default=-5.0, help="clamp value (mode set)")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--budget", type=float, default=20.0, help="bound on ||delta||_F")
  p.add_argument("--projection", default="encoder", help="none | encoder | encoder_exact | jacobian | jacobian_exact")
  p.add_argument("--shared", action="store_true", help="one delta for all prompts (the reference IOI)")
  p.add_argument("--min_budget", default="", help="comma list of relative budgets rho: each prompt's smallest")
  return p.parse_args(argv)


def main(argv=None):
  a = parse(argv)
  from recovery_jax.tasks import ioi  # the IOI prompt generator
  model = rj.load_model(a.model, processing=a.processing)
  sae = rj.load_sae(a.sae, model, site=a.site or None)
  batch = ioi.make_ioi_batch(model.tokenizer, a.n_prompts, seed=a.seed, bos_id=model.cfg.bos_token_id if model.cfg.is_gemma
                             else None, pad_id=model.cfg.pad_token_id or 0)
  behaviour = rj.LogitDiff(correct=batch.io_ids.tolist(), wrong=batch.s_ids.tolist())
  prompts = (batch.tokens, batch.attention_mask)
  features = rj.top_features(model, sae, prompts, behaviour, k=a.k)
  defence = rj.defence(sae, features, value=a.value, mode="set")
  config = rj.RecoveryConfig(steps=a.steps, lr=a.lr, budget=a.budget, projection=a.projection)
  grid = [float(x) for x in a.min_budget.split(",") if x.strip()] or None
  verdicts = rj.recover(model, defence, prompts, behaviour, config=config, shared=a.shared, min_budget=grid)
  print(f"{len(features)} features clamped at {sae.site}: {features.tolist()}")
  print(rj.table(verdicts))
  return verdicts


if __name__ == "__main__":
  main(sys.argv[1:])
