r"""Pod scale on paper: ahead-of-time compile of a recovery step on a fake 64-device mesh, no weights.

  PYTHONPATH=/path/to/libtpu_pkg nice -n 19 python -m bench.aot_memory   # the docs/scale.md table
  python -m bench.aot_memory --models=gemma2-9b --meshes=8x8 --targets=cpu --out_dir=/tmp/aot

For each model shape (Gemma 2 9B, Gemma 2 27B, Llama 3 70B; ``models/random_init.py``) with an SAE at
a mid layer, and each ``data x model`` split of 64 CPU devices, the step ``recovery_step`` (value and
gradient of a logit-difference readout w.r.t. a delta added after a sparse SAE clamp) is lowered with
``jax.ShapeDtypeStruct`` arguments carrying ``NamedSharding``s (params tensor-parallel over ``model``
by ``models.sharding.param_shardings``, SAE latents over ``model``, prompts over ``data``) and
compiled by XLA:CPU's SPMD partitioner. Reported per device: ``compiled.memory_analysis()``
(arguments, outputs, temporaries, generated code), the collectives in the partitioned HLO (static
op counts, and bytes moved per step with ops inside scanned layer loops multiplied by their trip
count), and whether the total fits a 16 GiB (TPU v5e) and an 80 GiB (H100) device with 10% headroom.
Targets: ``cpu`` compiles for the 64 fake CPU devices. XLA:CPU has no native bf16 matmul: it
converts bf16 weight stacks to f32 copies (hoisted out of the layer loop), so its temporaries
overstate what an accelerator needs. ``tpu-v5e`` compiles the same program for an abstract TPU v5e
8x8 slice (``jax.experimental.topologies.get_topology_desc``; needs the ``libtpu`` wheel matching
jax, importable e.g. from an unpacked wheel on ``PYTHONPATH``, no TPU needed): that is the XLA:TPU
buffer assignment, the figure to plan a pod with. Argument and output sizes agree between targets.

Results go to ``<out_dir>/aot_memory.json`` and ``.md``.
"""

from __future__ import annotations

import os
import sys

N_DEVICES = 64
if "jax" in sys.modules:
  raise RuntimeError("bench.aot_memory must be imported before jax (it sets the fake device count)")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import json
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from recovery_jax import intervene
from recovery_jax.models import random_init, sharding, transformer
from recovery_jax.models.config import ModelConfig
from recovery_jax.sae.config import SAEConfig
from recovery_jax.sweep import make_mesh

GIB = 2 ** 30
DEVICES = {"TPU v5e (16 GiB)": 16 * GIB, "H100 (80 GiB)": 80 * GIB}
HEADROOM = 0.9  # a program "fits" when its total is at most 90% of the device memory


@dataclasses.dataclass(frozen=True)
class Setup:
  """One model shape with its SAE: site, latents, architecture (as the public SAE for that model)."""

  name: str
  make_cfg: object
  layer: int
  d_sae: int
  architecture: str
  sae_note: str


SETUPS = {
    "gemma2-9b": Setup("gemma2-9b", random_init.gemma2_9b_config, 20, 16384, "jumprelu",
                       "Gemma Scope 9B pt-res layer 20, width 16k"),
    "gemma2-27b": Setup("gemma2-27b", random_init.gemma2_27b_config, 22, 131072, "jumprelu",
                        "Gemma Scope 27B pt-res layer 22, width 131k"),
    "llama3-70b": Setup("llama3-70b", random_init.llama3_70b_config, 50, 65536, "standard",
                        "Goodfire Llama-3.3-70B layer 50, 65k (ReLU)"),
}
MESHES = ("64x1", "16x4", "8x8", "4x16", "2x32", "1x64")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def recovery_step(cfg: ModelConfig, spec: intervene.ClampSpec, remat: bool):
  """The step whose memory is measured: ``(params, sae, cp, delta [B, D] f32, tokens [B, T], ids [B, 2])
  -> (objective, d objective / d delta)``. The objective is the logit difference ids[:, 0] - ids[:, 1]
  at the last position, summed over prompts, through the forward with the sparse clamp at
  ``spec.site`` and delta added at the last position after it (the defended state plus delta).

  This is the one function the engine's real step replaces (Adam and the projections add only
  [B, D]-sized state).
  """
  def objective(delta, params, sae, cp, tokens, ids):
    def edit(x, positions):
      x = intervene.clamp_residual(spec, sae, cp, x, positions)
      return x.astype(jnp.float32).at[:, -1].add(delta)
    out = transformer.forward(params, cfg, tokens, edits={spec.site: edit}, compute_logits=False, remat=remat)
    logits = transformer.final_logits_at(params, cfg, out.resid[:, -1:], ids)[:, 0]  # [B, 2]
    return (logits[:, 0] - logits[:, 1]).sum()

  def step(params, sae, cp, delta, tokens, ids):
    return jax.value_and_grad(objective)(delta, params, sae, cp, tokens, ids)
  return step


def abstract_inputs(setup: Setup, cfg: ModelConfig, mesh, batch: int, seq: int, k: int, param_dtype):
  """ShapeDtypeStructs with shardings for every argument of ``recovery_step``; no arrays are made."""
  sds = lambda tree, shardings: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                             tree, shardings)
  params = jax.eval_shape(lambda: random_init.init_params(cfg, jax.random.key(0), param_dtype))
  params = sds(params, sharding.param_shardings(params, cfg, mesh))
  f32 = jnp.float32
  d, n = cfg.d_model, setup.d_sae
  sae = {"W_enc": jax.ShapeDtypeStruct((d, n), f32), "b_enc": jax.ShapeDtypeStruct((n,), f32),
         "W_dec": jax.ShapeDtypeStruct((n, d), f32), "b_dec": jax.ShapeDtypeStruct((d,), f32)}
  if setup.architecture == "jumprelu":
    sae["threshold"] = jax.ShapeDtypeStruct((n,), f32)
  sae = sds(sae, sharding.sae_param_shardings(sae, mesh))
  rep = NamedSharding(mesh, P())
  cp = intervene.ClampParams(jax.ShapeDtypeStruct((k,), jnp.int32, sharding=rep),
                             jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=rep),
                             jax.ShapeDtypeStruct((), f32, sharding=rep))
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  return params, sae, cp, rows((batch, d), f32), rows((batch, seq), jnp.int32), rows((batch, 2), jnp.int32)


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO result type like ``bf16[4,128,3584]{...}`` or a tuple of them."""
  sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
  total = 0
  for dt, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([0-9,]*)\]", text):
    n = 1
    for x in dims.split(","):
      n *= int(x) if x else 1
    total += n * sizes[dt]
  return total


def collectives(hlo: str) -> dict:
  """Static counts of collective ops in a partitioned HLO module, and the bytes they produce per step
  (ops in while bodies times the loop's known trip count, nested loops multiplied)."""
  comps, cur, entry = {}, None, None
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
    elif cur is not None and line.strip() and line.strip() != "}":
      comps[cur].append(line)
  counts = {c: 0 for c in COLLECTIVES}
  bytes_static = {c: 0 for c in COLLECTIVES}
  edges = {}  # computation -> [(callee, multiplier)]
  for name, lines in comps.items():
    for line in lines:
      for c in COLLECTIVES:
        if re.search(rf"= .*? {c}(-start)?\(", line):
          counts[c] += 1
          bytes_static[c] += _shape_bytes(line.split("=", 1)[1].split(f" {c}", 1)[0])
      wm = re.search(r" while\(.*body=%?([\w.\-]+)", line)
      if wm:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        edges.setdefault(name, []).append((wm.group(1), int(trip.group(1)) if trip else 1))
      for callee in re.findall(r"(?:to_apply|calls|condition|true_computation|false_computation|"
                               r"branch_computations)=\{?%?([\w.\-]+)", line):
        edges.setdefault(name, []).append((callee, 1))
  mult = {}

  def visit(name, m):
    mult[name] = mult.get(name, 0) + m
    for callee, k in edges.get(name, []):
      if callee in comps:
        visit(callee, m * k)

  if entry:
    visit(entry, 1)
  per_step = {c: 0 for c in COLLECTIVES}
  for name, lines in comps.items():
    for line in lines:
      for c in COLLECTIVES:
        if re.search(rf"= .*? {c}(-start)?\(", line):
          per_step[c] += mult.get(name, 0) * _shape_bytes(line.split("=", 1)[1].split(f" {c}", 1)[0])
  return {"counts": counts, "bytes_per_step": per_step}


def target_devices(target: str):
  """The 64 devices to compile for: fake CPU devices, or an abstract TPU v5e 8x8 slice (needs libtpu)."""
  if target == "cpu":
    return jax.devices()
  if target == "tpu-v5e":
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:8x8").devices
  raise ValueError(f"unknown target {target!r}: expected cpu or tpu-v5e")


def run_one(setup: Setup, mesh_name: str, *, batch: int, seq: int, k: int, param_dtype, act_dtype: str,
            remat: bool, target: str = "cpu", devices=None) -> dict:
  data, model = (int(x) for x in mesh_name.split("x"))
  cfg = setup.make_cfg().replace(dtype=act_dtype)
  mesh = make_mesh(data, model, devices)
  site = f"blocks.{setup.layer}.hook_resid_post"
  sae_cfg = SAEConfig(architecture=setup.architecture, d_in=cfg.d_model, d_sae=setup.d_sae, hook_name=site)
  spec = intervene.ClampSpec(site=site, sae_cfg=sae_cfg, mode="set", positive_only=True)
  args = abstract_inputs(setup, cfg, mesh, batch, seq, k, param_dtype)
  step = recovery_step(cfg, spec, remat)
  t0 = time.time()
  with jax.set_mesh(mesh):
    lowered = jax.jit(step).lower(*args)
  t1 = time.time()
  row = {"target": target, "model": setup.name, "mesh": mesh_name, "data": data, "model_axis": model,
         "batch": batch, "seq": seq, "k": k, "sae": f"{setup.architecture} d_sae={setup.d_sae} at {site}",
         "sae_note": setup.sae_note, "param_dtype": jnp.dtype(param_dtype).name, "act_dtype": act_dtype,
         "remat": remat, "lower_s": round(t1 - t0, 1), "loadavg": [round(x, 2) for x in os.getloadavg()]}
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses programs that exceed HBM: that is a result
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
    return {**row, "oom": str(e).splitlines()[0][:300], "oom_temp_gib": float(need.group(1)) if need else None,
            "fits": {d: False for d in DEVICES} | ({"H100 (80 GiB)": None} if target == "tpu-v5e" else {}),
            "compile_s": round(time.time() - t1, 1)}
  t2 = time.time()
  ma = compiled.memory_analysis()
  mem = {f: int(getattr(ma, f"{f}_size_in_bytes")) for f in ("argument", "output", "temp", "generated_code", "alias")}
  total = mem["argument"] + mem["output"] + mem["temp"] + mem["generated_code"] - mem["alias"]
  coll = collectives(compiled.as_text())
  return {**row, "memory": mem, "total": total, "fits": {d: total <= HEADROOM * cap for d, cap in DEVICES.items()},
          "collectives": coll, "compile_s": round(t2 - t1, 1)}


def _gib(x: int) -> str:
  return f"{x / GIB:.2f}"


def markdown(rows: list[dict]) -> str:
  head = ("| target | model | mesh data x model | args GiB | out GiB | temp GiB | code MiB | total GiB | fits 16 GiB v5e "
          "| fits 80 GiB H100 | all-reduce | all-gather | reduce-scatter | all-to-all | coll.-permute "
          "| GiB moved / step | compile s |")
  lines = [head, "|" + "---|" * 17]
  yes = lambda b: "?" if b is None else "yes" if b else "no"
  for r in rows:
    if "oom" in r:
      need = f"> 15.75 (temp alone {r['oom_temp_gib']})" if r.get("oom_temp_gib") else "> HBM"
      lines.append(f"| {r['target']} | {r['model']} | {r['data']} x {r['model_axis']} | | | | | {need} "
                   f"| no (XLA:TPU refuses: out of HBM) | {yes(r['fits']['H100 (80 GiB)'])} | | | | | | | "
                   f"{r['compile_s']} |")
      continue
    m, c = r["memory"], r["collectives"]
    moved = sum(c["bytes_per_step"].values())
    lines.append(
        f"| {r['target']} | {r['model']} | {r['data']} x {r['model_axis']} | {_gib(m['argument'])} | {_gib(m['output'])} "
        f"| {_gib(m['temp'])} | {m['generated_code'] / 2 ** 20:.1f} | {_gib(r['total'])} "
        f"| {yes(r['fits']['TPU v5e (16 GiB)'])} | {yes(r['fits']['H100 (80 GiB)'])} | "
        + " | ".join(str(c["counts"][k]) for k in COLLECTIVES) + f" | {_gib(moved)} | {r['compile_s']} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default=",".join(SETUPS))
  ap.add_argument("--meshes", default=",".join(MESHES))
  ap.add_argument("--batch", type=int, default=64, help="prompts B (sharded over data)")
  ap.add_argument("--seq", type=int, default=128, help="tokens T per prompt (full forward)")
  ap.add_argument("--k", type=int, default=64, help="clamped features K")
  ap.add_argument("--param_dtype", default="bfloat16")
  ap.add_argument("--act_dtype", default="bfloat16", help="ModelConfig.dtype (compute dtype)")
  ap.add_argument("--remat", action="store_true", help="jax.checkpoint each block (forward(remat=True))")
  ap.add_argument("--targets", default="cpu,tpu-v5e", help="cpu and/or tpu-v5e (skipped without libtpu)")
  ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args(argv)
  assert jax.device_count() == N_DEVICES, jax.devices()
  meta = {"command": "python -m bench.aot_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
          "jax": jax.__version__, "headroom": HEADROOM, "skipped": {},
          "targets": {"cpu": f"{N_DEVICES} fake CPU devices (XLA:CPU SPMD partitioner)",
                      "tpu-v5e": "abstract TPU v5e 8x8 topology (libtpu AOT, no TPU attached)"}}
  rows = []
  os.makedirs(args.out_dir, exist_ok=True)
  for target in args.targets.split(","):
    try:
      devices = target_devices(target)
    except Exception as e:  # pylint: disable=broad-except
      meta["skipped"][target] = f"{type(e).__name__}: {e}"[:300]
      print(f"skipping target {target}: {meta['skipped'][target]}", flush=True)
      continue
    assert len(devices) == N_DEVICES, (target, len(devices))
    for name in args.models.split(","):
      for mesh_name in args.meshes.split(","):
        r = run_one(SETUPS[name], mesh_name, batch=args.batch, seq=args.seq, k=args.k,
                    param_dtype=jnp.dtype(args.param_dtype), act_dtype=args.act_dtype, remat=args.remat,
                    target=target, devices=devices)
        rows.append(r)
        print(json.dumps({k: r.get(k) for k in ("target", "model", "mesh", "total", "oom", "fits", "compile_s")}),
              flush=True)
        _write(args, meta, rows)
  print(markdown(rows))


def _write(args, meta: dict, rows: list[dict]):
  with open(os.path.join(args.out_dir, "aot_memory.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(args.out_dir, "aot_memory.md"), "w") as f:
    f.write(f"# AOT memory of the recovery step (per device)\n\n`{meta['command']}` (jax {jax.__version__}); "
            f"B={args.batch} prompts x T={args.seq} tokens, K={args.k} clamped features, params "
            f"{args.param_dtype}, activations {args.act_dtype}, remat={args.remat}. Targets: "
            + "; ".join(f"{k}: {v}" for k, v in meta["targets"].items())
            + (f". Skipped: {meta['skipped']}" if meta["skipped"] else "") + ".\n\n" + markdown(rows) + "\n")

if __name__ == "__main__":
  main()
