"""Tensor-parallel params (``models/sharding.py``): same numbers on 8 fake CPU devices as on one.

The multi-device part runs in one subprocess (``XLA_FLAGS`` must be set before JAX starts) that
checks every family and mesh shape and prints a JSON report; the fast tests check the placement rules.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from recovery_jax.models import random_init, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((1, 1), (2, 4), (8, 1), (1, 8))
FAMILIES = ("llama", "gpt2", "gemma3")
SITE, CAPTURES = "blocks.1.hook_resid_pre", ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")


def _model(family):
  """8 heads (GQA 8/2 for llama: KV replicated at model 4 and 8; 8/4 for gemma3: KV split at model 4),
  vocab 128 (split) except gpt2's 100 (not divisible by 8: replicated at model 8)."""
  kv = {"llama": 2, "gpt2": 8}.get(family, 4)
  vocab = 100 if family == "gpt2" else 128
  return random_init.random_model(family, n_layers=2, d_model=64, n_heads=8, n_kv_heads=kv, d_mlp=128,
                                  vocab_size=vocab, seed=3)


def _child() -> dict:
  """Runs in the 8-device subprocess: per family and mesh, the max abs. error against one device."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from recovery_jax.models import transformer  # pylint: disable=import-outside-toplevel
  from recovery_jax.sweep import make_mesh  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == 8, jax.devices()
  report = {}
  for family in FAMILIES:
    params, cfg = _model(family)
    b, t = 8, 10
    tokens = jnp.asarray(random_init.random_tokens(5, b, t, cfg.vocab_size))
    delta = jnp.asarray(np.random.default_rng(7).standard_normal((b, cfg.d_model)), jnp.float32)

    def readout(delta, params, tokens):
      edit = {SITE: lambda x, pos: x.at[:, -1].add(delta)}
      out = transformer.forward(params, cfg, tokens, edits=edit, capture=CAPTURES)
      value = (out.logits[:, -1, 3] - out.logits[:, -1, 4]).sum() + 0.1 * out.captures[CAPTURES[1]].sum()
      return value, (out.logits, out.captures)

    step = jax.value_and_grad(readout, has_aux=True)
    ref = None
    for data, model in MESHES:
      mesh = make_mesh(data, model, jax.devices()[: data * model])
      p = sharding.shard_params(params, cfg, mesh)
      args = (jax.device_put(delta, sharding.batch_sharding(mesh, 2)), p,
              jax.device_put(tokens, sharding.batch_sharding(mesh, 2)))
      with jax.set_mesh(mesh):
        lowered = jax.jit(step).lower(*args)
        compiled = lowered.compile()
        (value, (logits, caps)), grad = compiled(*args)
      hlo = compiled.as_text()
      got = {"value": value, "logits": logits, "grad": grad, **caps}
      key = f"{family} {data}x{model}"
      if ref is None:
        ref = got
      w_q = p["blocks"]["attn"]["W_Q"].addressable_shards[0].data.shape[2]
      w_e = p["embed"]["W_E"].addressable_shards[0].data.shape[0]
      report[key] = {
          "err": {k: float(np.abs(np.asarray(got[k]) - np.asarray(ref[k])).max()) for k in ref},
          "scale": {k: float(np.abs(np.asarray(ref[k])).max()) for k in ref},
          "w_q_heads_per_device": int(w_q), "w_e_rows_per_device": int(w_e),
          "all_reduce": hlo.count("all-reduce("), "all_gather": hlo.count("all-gather("),
          "constraints_in_mesh": lowered.as_text().count("sharding_constraint"),
          "grad_sharding": str(grad.sharding.spec),
      }
    if family == "llama":  # sharded inputs but no ambient mesh: the forward adds no constraint
      report["constraints_without_mesh"] = jax.jit(step).lower(*args).as_text().count("sharding_constraint")
  return report


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.test_model_sharding"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.multidevice
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_forward_and_grad_equal_one_device(report, family):
  cfg = _model(family)[1]
  for data, model in MESHES[1:]:
    r = report[f"{family} {data}x{model}"]
    for k, err in r["err"].items():
      assert err <= 1e-5 * max(1.0, r["scale"][k]), (family, data, model, k, err, r["scale"][k])
    # the params really are split over model, and the compiler communicates over it
    assert r["w_q_heads_per_device"] == cfg.n_heads // model
    want_v = cfg.vocab_size // model if cfg.vocab_size % model == 0 else cfg.vocab_size
    assert r["w_e_rows_per_device"] == want_v
    assert r["all_gather"] == 0  # no activation or weight is gathered: batch stays split over data
    if model > 1:
      assert r["all_reduce"] > 0 and r["constraints_in_mesh"] > 0
    else:
      assert r["constraints_in_mesh"] == 0
    assert r["grad_sharding"].startswith("P('data'")  # the batch stays over data
  assert report["constraints_without_mesh"] == 0


def test_param_specs_of_pod_shapes():
  """Placement rules on the 9B/27B/70B shapes (abstract params, no weights)."""
  for make, n in ((random_init.gemma2_9b_config, 16), (random_init.llama3_70b_config, 16)):
    cfg = make()
    params = jax.eval_shape(lambda: random_init.init_params(cfg, jax.random.key(0), jax.numpy.bfloat16))
    specs = sharding.param_specs(params, cfg, n)
    attn, mlp = specs["blocks"]["attn"], specs["blocks"]["mlp"]
    assert attn["W_Q"] == P(None, None, "model", None) and attn["W_O"] == P(None, "model", None, None)
    assert mlp["W_in"] == mlp["W_gate"] == P(None, None, "model") and mlp["W_out"] == P(None, "model", None)
    assert specs["embed"]["W_E"] == P("model", None)
    assert specs["blocks"]["ln1"]["w"] == P() and specs["ln_final"]["w"] == P()
    # 8 KV heads: replicated over 16 model shards, split over 8
    assert attn["W_K"] == attn["W_V"] == P()
    assert sharding.param_specs(params, cfg, 8)["blocks"]["attn"]["W_K"] == P(None, None, "model", None)
    if not cfg.tie_embeddings:
      assert specs["unembed"]["W_U"] == P(None, "model")
    assert "not divisible" in sharding.plan(params, cfg, 16)["blocks/attn/W_K"]
  gpt2 = random_init.gpt2_small_config()
  params = jax.eval_shape(lambda: random_init.init_params(gpt2, jax.random.key(0)))
  specs = sharding.param_specs(params, gpt2, 4)
  assert specs["embed"]["W_E"] == P()  # 50257 is not divisible by 4
  assert specs["blocks"]["attn"]["b_Q"] == P(None, "model", None) and specs["blocks"]["attn"]["b_O"] == P()
  assert specs["blocks"]["mlp"]["b_in"] == P(None, "model") and specs["pos_embed"]["W_pos"] == P()
  assert jax.tree.leaves(sharding.param_specs(params, gpt2, 1), is_leaf=lambda x: isinstance(x, P)) == [P()] * len(
      jax.tree.leaves(params))


if __name__ == "__main__":
  print(json.dumps(_child()))
