"""TPP latent-level recovery on the shared runner (paper-method sections 3, 7 and 10.1).

Prepare: load model + SAE -> class data (offline corpus topics, or a SAEBench-format file) ->
residual at the SAE site (one truncated forward per batch) -> mean-pooled train inputs and SAE
latents -> one-vs-rest probes (JAX/optax, vmapped over classes) -> latent effects -> the TPP
metric table for N in ``task.tpp_ns`` -> recovery problems: every positive test example of every
target class, with that class's probe.

Recovery runs on the probe path (``recovery.probe.recover_probe_grid``: SAE/probe algebra on the
cached test activations, no transformer forward), vmapped over grid points and problems; each
problem carries its own clamp (the zero-ablation of its class's top-N latents at every position,
error kept). Valid flip: clean probe logit > 0 and ablated <= 0; recovered: the probe logit of the
pooled ``h_def + delta`` > 0. Variants are the delta scope: ``last`` (one row at the last non-pad
position) and ``all`` (one row broadcast to every pooled position; its relative delta norm compares
the one row with the defended residual at all those positions). Drift and reactivation are over the
clamped latents at the delta columns (``task.monitor="delta"``: with the ``last`` scope no other
position changes) or at every pooled position (``"pooled"``, paper-method Q3: the same reactivated
entries over a larger eligible set).

Beside the runner's summary the app writes ``tpp.md`` / ``tpp.json``: probe accuracies, the TPP
metric table, and summaries per target and per dataset (unweighted: mean of per-target means;
weighted: per example) with the one-sided sign test of encoder vs none over targets.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import config_utils as cu
from recovery_jax import batching, errors, intervene, outputs, sweep
from recovery_jax.experiments import grid, runner
from recovery_jax.experiments import summary as summary_lib
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.recovery import api
from recovery_jax.recovery import probe as probe_lib
from recovery_jax.sae import core as sae_core
from recovery_jax.sae import harvest
from recovery_jax.tasks import tpp as tpp_task
from recovery_jax.tasks import tpp_probes as tp
from recovery_jax.experiments.tpp.report import render_tpp, tpp_summary

VARIANTS = ("last", "all")
SOURCES = ("corpus", "file")
MONITOR = ("pooled", "delta")


def check(config) -> None:
  """TPP config values that need no model; errors name the field."""
  t = config.task
  cu.check_one_of(config, "task.source", SOURCES)
  if "threat" in config:
    cu.check_one_of(config, "threat", ("after", "before"))
  if len(t.classes) < 2:
    raise errors.UserError(f"config field 'task.classes'={tuple(t.classes)}: expected at least 2 classes")
  for name in ("task.n_train", "task.n_test", "task.context_len"):
    cu.check_at_least(config, name, 1)
  for c in t.targets:
    if c not in t.classes:
      raise errors.UserError(f"config field 'task.targets' has {c!r}: not one of task.classes {tuple(t.classes)}")
  cu.check_one_of(config, "task.monitor", MONITOR)
  cu.check_at_least(config, "sweep.n_features", 1, each=True)
  if t.label_names not in ("", "bias_in_bios"):
    raise errors.UserError(f"config field 'task.label_names'={t.label_names!r}: expected '' or 'bias_in_bios'")


def _resolve(path: str) -> str:
  """A relative corpus root: from the working directory, else from the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  return os.path.join(root, path)


def load_data(config, tok, bos_id, pad_id) -> tpp_task.ClassData:
  t = config.task
  kw = dict(context_len=int(t.context_len), n_train=int(t.n_train), n_test=int(t.n_test), seed=int(t.seed),
            bos_id=bos_id, pad_id=pad_id)
  if t.source == "corpus":
    return tpp_task.corpus_classes(_resolve(t.corpus_root), tuple(t.classes), tok, **kw)
  if not t.data_file or t.data_file.startswith("REQUIRED"):
    raise errors.UserError(f"config field 'task.data_file': {t.data_file or 'empty'} (a SAEBench-format file)")
  names = tpp_task.BIAS_IN_BIOS_PROFESSIONS if t.label_names == "bias_in_bios" else None
  return tpp_task.load_saebench_file(t.data_file, tok, classes=tuple(t.classes), text_field=t.text_field,
                                     label_field=t.label_field, label_names=names, **kw)


def _pooled_stats(params, mcfg, site, sae, scfg, tokens, mask, batch):
  """Pooled residual [n, d] and pooled SAE latents [n, d_sae], without keeping [n, T, d]."""
  def one_batch(b, _):
    toks, m = b
    h = tpp_task.site_activations(params, mcfg, site, toks, batch)
    return np.asarray(tp.mean_pool(jnp.asarray(h), jnp.asarray(m))), tp.pooled_latents(sae, scfg, h, m, batch)
  return batching.map_batched(one_batch, (tokens, mask), 8 * batch)


def prepare(config, workdir: str) -> grid.Grid:
  """Loads everything, trains the probes, computes the TPP table (``tpp_metric.json``); the grid for
  the runner."""
  log, t = runner.log, config.task
  log(f"loading model {config.model!r} and SAE {config.sae!r} at {config.site}")
  params, mcfg, tok = setup_lib.load_model(config.model, seed=config.seed)
  sae, scfg = setup_lib.load_sae(config.sae, mcfg, config.site, override=config.sae_override_checks,
                                 model_name=config.model)
  k_max = max(int(k) for k in config.sweep.n_features)
  if k_max > scfg.d_sae:
    raise errors.UserError(f"config field 'sweep.n_features': N={k_max} is larger than the SAE's d_sae={scfg.d_sae}")
  bos = mcfg.bos_token_id if harvest.wants_bos(mcfg) else None
  pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_ids or (0,))[0]
  data = load_data(config, tok, bos, pad)
  api.check_prompts(data.tokens, model_cfg=mcfg)  # ids, and the padded length vs the model's context
  exclude = harvest.excluded_ids(mcfg)
  mask = tpp_task.pool_mask(data.tokens, exclude)
  tpp_task.last_pooled(mask)  # every context keeps a token
  c = len(data.class_names)
  log(f"{data.name}: {c} classes x ({t.n_train} train + {t.n_test} test) contexts of <= {t.context_len} tokens")

  tr, te = ~data.test, data.test
  pooled_tr, zbar_tr = _pooled_stats(params, mcfg, config.site, sae, scfg, data.tokens[tr], mask[tr],
                                     int(t.activation_batch))
  h_te = tpp_task.site_activations(params, mcfg, config.site, data.tokens[te], int(t.activation_batch))
  mask_te, labels_te, labels_tr = mask[te], data.labels[te], data.labels[tr]
  probes = tp.fit_probes(pooled_tr, labels_tr, c, l1=float(t.probe_l1), lr=float(t.probe_lr),
                         epochs=int(t.probe_epochs), batch_size=int(t.probe_batch), seed=int(t.seed))
  idx_tr, y_tr = tp.ovr_sets(labels_tr, c, int(t.seed))
  idx_te, y_te = tp.ovr_sets(labels_te, c, int(t.seed) + 1)
  acc_train = tp.accuracies(pooled_tr, idx_tr, y_tr, probes)
  w_dec = np.asarray(sae_core.effective_decoder(sae, scfg), np.float32)
  effects = tp.latent_effects(zbar_tr, idx_tr, y_tr, probes, w_dec)
  clamp_spec = intervene.ClampSpec(site=config.site, sae_cfg=scfg, mode="zero", positive_only=True)
  ns = [int(n) for n in t.tpp_ns if int(n) <= scfg.d_sae]
  acc_test, table = tp.tpp_table(clamp_spec, sae, effects, probes, h_te, mask_te, idx_te, y_te, ns,
                                 int(t.activation_batch))
  log("probe accuracy (test): " + ", ".join(f"{n} {a:.3f}" for n, a in zip(data.class_names, acc_test)))
  for row in table:
    log(f"TPP N={row.n}: metric {row.total:.4f} (intended {row.intended.mean():.4f}, unintended "
        f"{row.unintended.mean():.4f})")
  tpp_info = {"dataset": data.name, "classes": list(data.class_names), "probe_acc_train": acc_train.tolist(),
              "probe_acc_test": acc_test.tolist(),
              "n_positive_effects": [int((effects[i] > 0).sum()) for i in range(c)],
              "tpp": [{"n": r.n, "total": r.total, "intended": r.intended.tolist(),
                       "unintended": r.unintended.tolist()} for r in table]}
  if runner.is_writer():
    outputs.atomic_write(os.path.join(workdir, "tpp_metric.json"), json.dumps(tpp_info, indent=1))

  targets = [data.class_names.index(x) for x in (t.targets or data.class_names)]
  ex_idx = np.concatenate([np.flatnonzero(labels_te == k) for k in targets])
  ex_cls = labels_te[ex_idx]
  problems = {v: _problems(h_te[ex_idx], mask_te[ex_idx], probes, ex_cls, v, t.monitor) for v in VARIANTS}
  clamps_of_n = {}

  def clamps(points):
    per_point = []
    for p in points:
      n = int(p["n_features"])
      if n not in clamps_of_n:
        clamps_of_n[n] = tp.class_clamps(clamp_spec, sae, effects, n, k_max)
      cl = clamps_of_n[n]
      per_point.append(cl.replace(params=jax.tree.map(lambda a: a[ex_cls], cl.params)))
    return (intervene.stack_clamps(per_point),)

  header = (f"model {config.model}, SAE {scfg.source or config.sae} at {config.site}; {data.name}: "
            f"{c} classes, {t.n_train} train + {t.n_test} test contexts each; probe test accuracy "
            + ", ".join(f"{n} {a:.3f}" for n, a in zip(data.class_names, acc_test))
            + f"; zero-ablation of each class's top-N latents at every position (error kept); "
            f"{config.recovery.steps} steps, lr {config.recovery.lr}; TPP metric "
            + ", ".join(f"N={r.n}: {r.total:.3f}" for r in table))
  examples = [{"target": data.class_names[k], "dataset": data.name, "test_index": int(i)}
              for i, k in zip(ex_idx, ex_cls)]
  # per example: ||w|| of its class's probe and its pooled token count (graded rows, budget needed)
  scope = {"w_norm": np.linalg.norm(np.asarray(probes.w, np.float64), axis=-1)[ex_cls],
           "n_pool": mask_te[ex_idx].sum(-1).astype(np.int64)}
  return grid.Grid(
      title="TPP latent-level recovery", header=header, params=None, problems=problems.__getitem__,
      spec=lambda mode, variant: probe_lib.ProbeSpec(grid.recovery_config(config, mode), variant == "all",
                                                     before=config.get("threat", "after") == "before"),
      clamps=clamps, valid=lambda rb, rd: (rb > 0) & (rd <= 0), recovered=lambda rr: rr > 0, examples=examples,
      objective_name="probe logit", data=scope, bisect=False)  # the probe path has no min_budget.recover_each


def _problems(h, mask, probes, cls, variant, monitor) -> probe_lib.ProbeProblem:
  """One problem per example (B = 1): [N, 1, ...]."""
  n, t, _ = h.shape
  cols = np.broadcast_to(np.arange(t, dtype=np.int32), (n, t))
  last = tpp_task.last_pooled(mask)[:, None].astype(np.int32)
  if variant == "last":
    dcols, dvalid = last, np.ones((n, 1), bool)
  else:
    dcols, dvalid = cols, mask
  mcols, mvalid = (cols, mask) if monitor == "pooled" else (dcols, dvalid)
  one = lambda a: jnp.asarray(a)[:, None]
  return probe_lib.ProbeProblem(
      h=one(h), pool_mask=one(mask), positions=one(cols), probe_w=jnp.asarray(probes.w)[cls],
      probe_b=jnp.asarray(probes.b)[cls], delta_cols=one(dcols), delta_valid=one(dvalid), monitor_cols=one(mcols),
      monitor_valid=one(mvalid), row_weight=jnp.ones((n, 1), jnp.float32))


@jax.jit
def _drifts(clamps, out_feats, out_refs, out_masks, h_def, delta):
  """decode drift ||(E_S(h_def+delta) - E_S(h_def)) W_dec[S]|| over the monitored columns and
  pre-activation drift at the delta columns, per (point, problem, row): [G, N, B] each."""
  axes = intervene.clamp_axes((clamps,))[0]

  def one(c, f, r, m, h, d):  # f/r/m [B, M, K]; h [1, B, P, d]; d [1, P', d]
    dd = jnp.einsum("bmk,kd->bmd", jnp.where(m, f - r, 0.0), c.decoder_rows())
    x = h[0]
    pre = jnp.where(c.mask, c.pre_features(x + d[0][None]) - c.pre_features(x), 0.0)
    return jnp.sqrt(jnp.sum(dd * dd, axis=(-2, -1))), jnp.sqrt(jnp.sum(pre * pre, axis=(-2, -1)))

  per_point = lambda c, f, r, m, h, d: jax.vmap(one, in_axes=(axes, 0, 0, 0, 0, 0))(c, f, r, m, h, d)
  return jax.vmap(per_point, in_axes=(axes, 0, 0, 0, 0, 0))(clamps, out_feats, out_refs, out_masks, h_def, delta)


def compute_unit(setting: grid.Grid, config, mesh, u: sweep.WorkUnit) -> dict[str, Any]:
  """One unit on the probe path: every point of the unit x every problem, in batches of problems
  sharded over the mesh's ``data`` axis (``batching.map_batched``; problem i of point g uses
  ``fold_in(key_g, i)`` whatever the batch or device count)."""
  mode, variant = u.group
  spec = setting.spec(mode, variant)
  (clamps,) = setting.clamps(u.points)
  g = len(u.points)
  hp = spec.config.hparams(budget=np.asarray([float(p.get("budget", spec.config.budget)) for p in u.points],
                                             np.float32))
  hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (g,)), hp)
  keys = jnp.stack([sweep.point_key(int(p.get("seed", 0)), p["point_id"]) for p in u.points])
  pbs = setting.problems(variant)
  per_problem = jax.tree.map(lambda a: np.moveaxis(np.asarray(a), 1, 0), clamps.params)  # [N, G, ...]

  def one_batch(batch, ids):
    sub, cparams = batch
    cl = clamps.replace(params=jax.tree.map(lambda a: jnp.moveaxis(jnp.asarray(a), 0, 1), cparams))
    out = probe_lib.recover_probe_grid(spec, cl, jax.tree.map(jnp.asarray, sub), hp, keys, ids=ids)
    masks = jnp.broadcast_to(out.masks[0], out.feats[0].shape)
    dec, pre = _drifts(cl, out.feats[0], out.refs[0], masks, out.h_def, out.delta)
    res = {"rows_base": out.rows_base, "rows_defended": out.rows_defended, "rows": out.rows,
           "feats": {"000": out.feats[0]}, "refs": {"000": out.refs[0]}, "masks": {"000": masks},
           "delta": out.delta, "h_def": out.h_def, "history_objective": out.history["objective"],
           "history_delta_norm": out.history["delta_norm"], "diverged": out.diverged, "decode_drift": dec,
           "pre_drift": pre, "budget": out.budget}
    return jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), res)  # [G, B, ...] -> [B, G, ...]

  res = batching.map_batched(one_batch, (pbs, per_problem), int(config.task.recover_chunk) or None,
                             mesh=mesh if jax.process_count() == 1 else None)
  return jax.tree.map(lambda a: np.moveaxis(a, 0, 1), res)  # [N, G, ...] -> [G, N, ...]


def add_scope_fields(rows: list[dict], scope: dict) -> None:
  """Adds to each row (in place): ``graded_recovery`` (``tasks.tpp.graded_recovery`` of its ablated
  and recovered probe logits), ``budget_needed`` (the least ||delta|| of its scope that can flip the
  probe, ``tasks.tpp.budget_needed``) and ``n_pooled``. scope: w_norm [N], n_pool [N] by example."""
  if not rows:
    return
  e = np.asarray([r["example"] for r in rows])
  n_pool = scope["n_pool"][e]
  n_delta = np.where(np.asarray([r["variant"] for r in rows]) == "all", n_pool, 1)
  defended = np.asarray([r["defended"] for r in rows], np.float64)
  graded = tpp_task.graded_recovery(defended, np.asarray([r["recovered_score"] for r in rows], np.float64))
  need = tpp_task.budget_needed(defended, scope["w_norm"][e], n_delta, n_pool)
  for r, g, b, n in zip(rows, graded, need, n_pool):
    r.update(graded_recovery=float(g), budget_needed=float(b), n_pooled=int(n))


def _write_tpp(workdir: str, rows, info: dict) -> tuple[str, dict]:
  """tpp.md / tpp.json from the rows and the TPP table (``tpp_metric.json``'s content)."""
  summary = tpp_summary(rows)
  text = render_tpp(summary, info)
  outputs.atomic_write(os.path.join(workdir, "tpp.md"), text)
  outputs.atomic_write(os.path.join(workdir, "tpp.json"), json.dumps({**info, **summary}, default=float))
  return text, summary


class TPP(grid.GridSetting):
  """Units on the probe path (``compute_unit`` above); tpp.md / tpp.json beside the summary."""

  name, variants = "tpp", VARIANTS

  def check(self, config) -> None:
    check(config)

  def prepare(self, config, workdir: str, mesh) -> grid.Grid:
    del mesh
    return prepare(config, workdir)

  def compute_unit(self, config, ctx: grid.Grid, mesh, unit: sweep.WorkUnit) -> dict[str, Any]:
    return compute_unit(ctx, config, mesh, unit)

  def unit_rows(self, config, ctx: grid.Grid, unit: sweep.WorkUnit, result: dict):
    """The grid's rows plus ``graded_recovery``, ``budget_needed`` and ``n_pooled`` per example."""
    rows, curves = super().unit_rows(config, ctx, unit, result)
    add_scope_fields(rows, ctx.data)
    return rows, curves

  def finish(self, config, ctx: grid.Grid, workdir: str, rows, curves, wall_s: float) -> dict[str, Any]:
    out = super().finish(config, ctx, workdir, rows, curves, wall_s)
    return {**out, "tpp": tpp_summary(rows)}

  def render(self, workdir: str, plots: bool = True) -> str:
    """summary.md from the rows, then tpp.md / tpp.json from the rows and ``tpp_metric.json``."""
    text = super().render(workdir, plots)
    path = os.path.join(workdir, "tpp_metric.json")
    if not os.path.exists(path):
      raise errors.UserError(f"{workdir}: not a finished TPP run (missing {path})")
    with open(path) as f:
      info = json.load(f)
    tpp_text, _ = _write_tpp(workdir, summary_lib.read_jsonl(os.path.join(workdir, "results.jsonl")), info)
    return text + "\n" + tpp_text


SETTING = TPP()


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the TPP experiment of ``config`` into ``workdir``; returns the rows, the runner's summary and
  the TPP summary."""
  return runner.run(config, workdir, SETTING)


def render(workdir: str, plots: bool = True) -> str:
  return SETTING.render(workdir, plots)
