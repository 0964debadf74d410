"""The first steps of one JumpReLU SAE of the suite recipe on a harvested store, with the encoder-init
and threshold knobs exposed: the probe behind assets/README.md ("Why L0 ended at 10-13 in v1").

  python scripts/jumprelu_init_probe.py --store=runs/sae_suite/acts/train --site=blocks.24.hook_resid_post \
      --enc_scale=lsq --thr_lr=10 --steps=250

Prints the init reconstruction's least-squares scale c* and, every 25 steps, the training-batch
explained variance and mean L0. The recipe is configs/train_sae_suite.py's with this script's knobs
(defaults: v1's threshold learning rate and no L0 target), its 878-step schedule stopped after --steps.
"""

import argparse
import dataclasses
import importlib.util
import pathlib
import time

import jax
import numpy as np

from recovery_jax.sae import pipeline, train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--store", required=True, help="a harvest folder holding <site>.npy")
  ap.add_argument("--site", required=True)
  ap.add_argument("--rows", type=int, default=250_000, help="first rows of the store to sample from")
  ap.add_argument("--enc_scale", choices=train_lib.ENCODER_INIT_SCALES, default="lsq")
  ap.add_argument("--thr_lr", type=float, default=1.0)
  ap.add_argument("--l0_coeff", type=float, default=0.4)
  ap.add_argument("--l0_target", type=float, default=0.0)
  ap.add_argument("--steps", type=int, default=200)
  a = ap.parse_args()
  x = np.load(f"{a.store}/{a.site}.npy", mmap_mode="r")[:a.rows]
  spec = importlib.util.spec_from_file_location("train_sae_suite", ROOT / "configs" / "train_sae_suite.py")
  suite = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suite)
  recipe = pipeline.train_config(suite.get_config(None), x.shape[1], total_steps=878)  # the suite's schedule
  tc = dataclasses.replace(recipe, l0_coeff=a.l0_coeff, encoder_init_scale="none", threshold_lr_scale=a.thr_lr,
                           l0_target=a.l0_target)
  sample = np.asarray(x[train_lib.batch_indices(len(x), tc.batch_size, 0, 1)], np.float32)  # train()'s init batch, seed 0
  st = train_lib.init_state(jax.random.PRNGKey(0), tc, sample, train_lib.make_optimizer(tc))
  print(f"c* = {train_lib.lsq_encoder_scale(st.params, tc, sample * float(st.input_scale)):.3f}")
  tc = dataclasses.replace(tc, encoder_init_scale=a.enc_scale)
  t0 = time.time()
  train_lib.train(tc, x, stop_after=a.steps, log_every=25, progress=False,
                  log_fn=lambda s, m: print(f"step {s}: EV {m['explained_variance']:.3f}  L0 {m['l0']:.1f}  "
                                            f"coeff {m['sparsity_coeff']:.3f}", flush=True))
  print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
