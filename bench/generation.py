r"""Greedy generation: the KV-cached JAX decoder against transformers' ``generate``, same model, same prompts.

  python -m bench.generation                                  # SmolLM2-135M-Instruct, batch 16, 128 new tokens
  python -m bench.generation --batch=4 --new_tokens=32 --repeats=1
  python -m bench.generation --tiny                           # a tiny random Llama (the smoke test)

Three variants generate ``--new_tokens`` tokens for the same ``--batch`` left-padded prompts:

  jax           ``recovery_jax.models.generate.generate_jit`` (prefill + ``lax.while_loop`` decode, KV cache)
  jax+clamp     the same with the refusal defence's clamp active at prefill and every decode step: a
                ``set`` clamp (``tasks/refusal_defence.py``, value ``--clamp_value``) of 8 features of the
                shipped TopK SAE at ``blocks.12.hook_resid_pre``, the features the refusal app selects
                with its default config (the openings contrast; ``experiments/refusal/app.py: _features``)
  transformers  ``model.generate(do_sample=False, use_cache=True)``: the model transformers builds from the
                same GGUF file (``--tiny``: ``bench.torch_loop.to_hf`` of the tiny model's params)

Every row generates exactly ``--new_tokens`` tokens: no stop tokens on the JAX side, and the HF
model's ``generation_config.eos_token_id`` is cleared (``min_new_tokens`` would mask the eos logit
and change the greedy tokens). Prompts: the first ``--batch`` shipped benign instructions
(``recovery_jax/data/refusal_prompts.jsonl``) in the model's chat template; ``--tiny``: random ids
of varied lengths. Timing: one warm-up call per variant, then ``--repeats`` timed calls, interleaved
round-robin over the variants (a load change hits all of them alike); the median is reported as
tokens per second (batch x new tokens / seconds, prefill included, as in ``generate``). The JAX
compile time (lower + compile, no persistent cache) and transformers' first call are reported
separately. torch's threads: ``--torch_threads`` (default: the machine's cores).

Agreement: the greedy tokens of ``jax`` and ``transformers`` on the first ``--agree_tokens``
tokens (rows whose first N tokens all agree, the fraction of agreeing tokens, the mean common
prefix), and how many rows the clamp changed. FLOPs are the model's analytic count
(``bench.flops.forward``: prefill, then one token per step over the real context), the same for
all variants; with ``--peak_sizes`` their rate is given as a fraction of the best jitted f32 matmul.
Floor (``bench.decode_floor``): a decode step's weight matmuls alone (every layer's Q, K, V, O, gate,
up and down projections and the unembedding, ``--batch`` rows each, nothing else), timed for JAX and
for torch, interleaved like the variants. ``batch / floor`` is the decode throughput no decoder built on that library's
matmuls can pass: attention, norms, the KV cache and the clamp all come on top.
Results: ``bench/results/generation_<date>.json`` and ``.md`` (``--tiny``: ``generation_tiny_<date>``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import decode_floor
from bench import flops as flops_lib
from bench import whole_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"
SITE = "blocks.12.hook_resid_pre"  # the refusal defence's site (configs/refusal.py)
TINY_SITE = "blocks.2.hook_resid_pre"
TINY_D_SAE = 128
VARIANTS = ("jax", "jax+clamp", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and a random SAE (smoke test)")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant after one warm-up (median)")
  ap.add_argument("--agree_tokens", type=int, default=32, help="greedy tokens compared between jax and transformers")
  ap.add_argument("--clamp_value", type=float, default=4.0, help="the set clamp's value (the demo's strength)")
  ap.add_argument("--features", default="", help="comma list of SAE feature ids to clamp (default: the refusal "
                  "app's default selection; --tiny: 0..7)")
  ap.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: os.cpu_count())")
  ap.add_argument("--torch_device", default="cpu", choices=("cpu", "cuda"))
  ap.add_argument("--no_torch", action="store_true", help="skip transformers (and the agreement check)")
  ap.add_argument("--no_floor", action="store_true", help="skip the weight-matmul floor of a decode step")
  ap.add_argument("--floor_dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the JAX floor's weights and rows (bfloat16: stored and multiplied in bf16)")
  ap.add_argument("--peak_sizes", default="", help="matmul sizes of a peak FLOP/s measurement (e.g. 512,1024,2048; "
                  "empty: none)")
  ap.add_argument("--out", default="", help="results JSON (default bench/results/generation[_tiny]_<date>.json; "
                  "the markdown table goes next to it as .md)")
  args = ap.parse_args(argv)
  for k in ("batch", "new_tokens", "repeats", "agree_tokens"):
    if getattr(args, k) < 1:
      ap.error(f"--{k}={getattr(args, k)}: must be >= 1")
  try:
    args.features = [int(f) for f in args.features.split(",") if f.strip()]
  except ValueError:
    ap.error(f"--features={args.features!r}: expected a comma list of integer feature ids")
  try:
    args.peak_sizes = [int(s) for s in args.peak_sizes.split(",") if s.strip()]
  except ValueError:
    ap.error(f"--peak_sizes={args.peak_sizes!r}: expected a comma list of integers")
  if not args.out:
    date = datetime.date.today().isoformat()
    args.out = os.path.join(ROOT, "bench", "results", f"generation{'_tiny' if args.tiny else ''}_{date}.json")
  return args


# ----------------------------------------------------------------------------------------------
# model, prompts, defence


def load_models(args):
  """(params, cfg, tokenizer or None, HF model or None, the HF model's source)."""
  from bench import problems  # pylint: disable=import-outside-toplevel
  if args.tiny:
    params, cfg, tok = problems.load_bench_model("tiny-llama")
    hf, source = None, "bench.torch_loop.to_hf(tiny-llama params)"
    if not args.no_torch:
      from bench import torch_loop  # pylint: disable=import-outside-toplevel
      hf = torch_loop.to_hf(params, cfg)
    return params, cfg, tok, hf, source
  from recovery_jax.models import loading  # pylint: disable=import-outside-toplevel
  params, cfg, tok = problems.load_bench_model("smollm2-135m")
  path = loading.resolve_named(MODEL)
  hf = None
  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  return params, cfg, tok, hf, f"transformers.AutoModelForCausalLM.from_pretrained(gguf_file={path})"


def prompts(args, cfg, tok) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
  """(tokens [batch, T], mask [batch, T], pad id, prompt texts): left-padded."""
  from recovery_jax.models import generate as gen  # pylint: disable=import-outside-toplevel
  pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
  if args.tiny:
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, cfg.vocab_size, size=int(n))) for n in rng.integers(4, 13, size=args.batch)]
    texts = []
  else:
    from recovery_jax.tasks import refusal as task  # pylint: disable=import-outside-toplevel
    shipped = task.load_prompts("", args.batch)
    texts = [task.format_prompt(MODEL, shipped[i % len(shipped)].text) for i in range(args.batch)]
    rows = [tok.encode(t, add_special_tokens=False).ids for t in texts]
  toks, mask = gen.left_pad(rows, pad_id=pad)
  return np.asarray(toks), np.asarray(mask), pad, texts


def defence(args, params, cfg, tok, pad: int, log):
  """(the set-clamp defence: a tuple of one ``Clamp``, record): ``args.features`` or the refusal app's
  default selection at ``SITE`` (``--tiny``: a random SAE at ``TINY_SITE``, features 0..7)."""
  from recovery_jax.tasks import refusal_defence as defence_lib  # pylint: disable=import-outside-toplevel
  if args.tiny:
    from recovery_jax.sae import testing as sae_testing  # pylint: disable=import-outside-toplevel
    site = TINY_SITE
    saes = {site: sae_testing.random_sae(cfg.d_model, TINY_D_SAE, seed=1, site=site, model_name=cfg.name)}
    feats = {site: args.features or list(range(8))}
    source = "random SAE"
  else:
    from recovery_jax import config_utils  # pylint: disable=import-outside-toplevel
    from recovery_jax.experiments import setup as setup_lib  # pylint: disable=import-outside-toplevel
    site = SITE
    saes = {site: setup_lib.load_sae("shipped", cfg, site, model_name=MODEL)}
    if args.features:
      feats, source = {site: args.features}, "--features"
    else:
      from recovery_jax.experiments.refusal import app  # pylint: disable=import-outside-toplevel
      config = config_utils.load_config_file("configs/refusal.py", (), root=ROOT)
      feats, _, _ = app._features(config, params, cfg, tok, saes, (site,), pad, log)  # pylint: disable=protected-access
      source = "the refusal app's default selection (configs/refusal.py)"
  clamp = defence_lib.make_defence(defence_lib.DefenceSpec("set"), saes, feats, args.clamp_value)
  return clamp, {"site": site, "kind": "set", "value": args.clamp_value,
                 "features": [int(f) for f in feats[site]], "source": source,
                 "d_sae": int(saes[site][1].d_sae)}


# ----------------------------------------------------------------------------------------------
# the variants


def jax_variant(params, cfg, toks, mask, pad: int, n_new: int, clamp=None):
  """(compile seconds, fn() -> tokens [batch, n_new] as numpy) for ``generate_jit``, compiled ahead."""
  from recovery_jax.models import generate as gen  # pylint: disable=import-outside-toplevel
  from recovery_jax.tasks import refusal_defence as defence_lib  # pylint: disable=import-outside-toplevel
  toks, mask = jnp.asarray(toks), jnp.asarray(mask)
  kw = dict(max_new_tokens=n_new, stop_tokens=(), pad_id=pad)
  edit_kw = {} if clamp is None else dict(edit_args=clamp)
  static = {} if clamp is None else dict(make_edits=defence_lib.edits)
  t0 = time.perf_counter()
  compiled = gen.generate_jit.lower(params, cfg, toks, mask, **edit_kw, **kw, **static).compile()
  compile_s = time.perf_counter() - t0

  def call():
    return np.asarray(jax.block_until_ready(compiled(params, toks, mask, **edit_kw).tokens))

  return compile_s, call


def torch_variant(hf, toks, mask, pad: int, n_new: int, device: str):
  """fn() -> new tokens [batch, n_new] of ``hf.generate`` (greedy, KV cache, no eos stop)."""
  import torch  # pylint: disable=import-outside-toplevel
  hf.to(device)
  hf.generation_config.eos_token_id = None  # exactly n_new tokens per row, greedy tokens unchanged
  ids = torch.tensor(toks, dtype=torch.long, device=device)
  am = torch.tensor(mask, dtype=torch.long, device=device)

  def call():
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=am, max_new_tokens=n_new, do_sample=False, use_cache=True,
                        pad_token_id=pad)
    if device == "cuda":
      torch.cuda.synchronize()
    new = out[:, ids.shape[1]:].cpu().numpy()
    if new.shape != (ids.shape[0], n_new):
      raise RuntimeError(f"transformers generated {new.shape[1]} tokens, expected {n_new}")
    return new

  return call


def round_robin(calls: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of ``repeats`` calls of each of ``calls`` (name -> fn()), interleaved: a change in the
  host's speed hits every entry alike."""
  times = {v: [] for v in calls}
  for _ in range(repeats):
    for v, call in calls.items():
      t = time.perf_counter()
      call()
      times[v].append(time.perf_counter() - t)
  return times


def generation_flops(cfg, batch: int, prompt_len: int, n_new: int) -> int:
  """Model FLOPs of one call: the prefill (logits of the last position) and ``n_new - 1`` decode steps
  of one token over the growing context (``bench.flops.forward``)."""
  total = flops_lib.forward(cfg, prompt_len, prompt_len, cfg.n_layers, 1)
  for i in range(1, n_new):
    total += flops_lib.forward(cfg, 1, prompt_len + i, cfg.n_layers, 1)
  return batch * total


def agreement(a: np.ndarray, b: np.ndarray, n: int) -> dict:
  """Greedy tokens [batch, T] of two decoders on the first ``n`` tokens."""
  n = min(n, a.shape[1])
  eq = a[:, :n] == b[:, :n]
  prefix = [int(np.argmin(r)) if not r.all() else n for r in eq]
  return {"tokens": n, "rows_agree": int(eq.all(axis=1).sum()), "rows": int(a.shape[0]),
          "token_fraction": float(eq.mean()), "mean_common_prefix": float(np.mean(prefix)),
          "min_common_prefix": int(min(prefix))}


def run(args, log=print) -> dict:
  from bench import recovery_throughput as rt  # pylint: disable=import-outside-toplevel
  result = {"command": "python -m bench.generation " + " ".join(sys.argv[1:]) if __name__ == "__main__"
            else "bench.generation.run", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items()}, "loadavg_start": os.getloadavg()}
  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  result["machine"] = rt.machine_info()
  log(f"machine: {result['machine'].get('lscpu_Model_name', '?')}, load average {result['loadavg_start']}")
  t0 = time.perf_counter()
  params, cfg, tok, hf, source = load_models(args)
  toks, mask, pad, texts = prompts(args, cfg, tok)
  clamp, result["defence"] = defence(args, params, cfg, tok, pad, log)
  result["load_s"] = time.perf_counter() - t0
  result.update(model="tiny-llama" if args.tiny else MODEL, hf_model=source, batch=args.batch,
                new_tokens=args.new_tokens, prompt_len=int(toks.shape[1]), prompt_tokens=int(mask.sum()),
                prompts=texts)
  log(f"{result['model']}: batch {args.batch}, prompt length {toks.shape[1]}, {args.new_tokens} new tokens; "
      f"clamp {result['defence']['kind']} {args.clamp_value:g} on {len(result['defence']['features'])} features at "
      f"{result['defence']['site']}")
  calls, compile_s = {}, {}
  compile_s["jax"], calls["jax"] = jax_variant(params, cfg, toks, mask, pad, args.new_tokens)
  compile_s["jax+clamp"], calls["jax+clamp"] = jax_variant(params, cfg, toks, mask, pad, args.new_tokens, clamp)
  if hf is not None:
    calls["transformers"] = torch_variant(hf, toks, mask, pad, args.new_tokens, args.torch_device)
  tokens, first_s = {}, {}
  for v, call in calls.items():  # warm-up (transformers: its first call)
    t = time.perf_counter()
    tokens[v] = call()
    first_s[v] = time.perf_counter() - t
  times = round_robin(calls, args.repeats)
  if not args.no_floor:
    floors = {"jax": decode_floor.jax_floor(params, args.batch, jnp.dtype(args.floor_dtype))}
    if hf is not None:
      floors["transformers"] = decode_floor.torch_floor(hf, args.batch, args.torch_device)
    floor_times = round_robin(floors, max(5, args.repeats))
    result["floor"] = {v: {"median_s": statistics.median(ts), "times_s": ts,
                           "tokens_per_s": args.batch / statistics.median(ts)} for v, ts in floor_times.items()}
  n_tok = args.batch * args.new_tokens
  fl = generation_flops(cfg, args.batch, int(toks.shape[1]), args.new_tokens)
  peak = rt.measure_peak(args.peak_sizes)["flops_per_s"] if args.peak_sizes else None
  rows = []
  for v in calls:
    med = statistics.median(times[v])
    rows.append({"variant": v, "median_s": med, "times_s": times[v], "tokens_per_s": n_tok / med,
                 "compile_s": compile_s.get(v), "first_call_s": first_s[v], "flops": fl, "flops_per_s": fl / med,
                 "peak_fraction": fl / med / peak if peak else None})
  by = {r["variant"]: r for r in rows}
  if "transformers" in by:
    for r in rows:
      r["speedup_vs_transformers"] = r["tokens_per_s"] / by["transformers"]["tokens_per_s"]
    result["agreement"] = agreement(tokens["jax"], tokens["transformers"], args.agree_tokens)
  result["clamp_changed_rows"] = int((tokens["jax"] != tokens["jax+clamp"]).any(axis=1).sum())
  result.update(rows=rows, peak_flops_per_s=peak, total_s=time.perf_counter() - t0, loadavg_end=os.getloadavg(),
                tokens={v: t.tolist() for v, t in tokens.items()})
  if tok is not None:
    result["texts"] = {v: [tok.decode(list(map(int, r))) for r in t[:2]] for v, t in tokens.items()}
  return result


def markdown(result: dict) -> str:
  head = ["variant", "tokens/s", "median s", "runs s", "compile s", "first call s", "GFLOP/s", "% of peak",
          "vs transformers"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in result["rows"]:
    lines.append("| " + " | ".join([
        r["variant"], f"{r['tokens_per_s']:.1f}", f"{r['median_s']:.3f}", ", ".join(f"{t:.3f}" for t in r["times_s"]),
        "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}", f"{r['first_call_s']:.2f}",
        f"{r['flops_per_s'] / 1e9:.1f}", "-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}",
        f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else "-"]) + " |")
  d = result["defence"]
  text = (f"Greedy generation, {result['model']}: batch {result['batch']}, {result['new_tokens']} new tokens, prompts "
          f"left-padded to {result['prompt_len']} tokens; clamp: {d['kind']} {d['value']:g} on features "
          f"{d['features']} at {d['site']} ({d['source']}); {result['machine'].get('lscpu_Model_name', '?')}, "
          f"{result['machine']['cpu_count']} CPUs, jax {result['machine']['jax']} "
          f"({', '.join(result['machine']['devices'])}), torch {result['machine'].get('torch', '-')} "
          f"({result['args']['torch_device']}); 1-min load {result['loadavg_start'][0]:.2f} at the start, "
          f"{result['loadavg_end'][0]:.2f} at the end. Median of {result['args']['repeats']} timed runs after one "
          "warm-up.\n\n" + "\n".join(lines) + "\n")
  if "agreement" in result:
    a = result["agreement"]
    text += (f"\nGreedy tokens, jax vs transformers, first {a['tokens']}: {a['rows_agree']}/{a['rows']} rows "
             f"identical, {100 * a['token_fraction']:.1f}% of tokens, common prefix mean {a['mean_common_prefix']:.1f} "
             f"(min {a['min_common_prefix']}).")
  text += f" The clamp changed {result['clamp_changed_rows']}/{result['batch']} rows.\n"
  if "floor" in result:
    n = len(next(iter(result["floor"].values()))["times_s"])
    text += ("\nThe floor: one decode step's weight matmuls alone (every projection and the unembedding, "
             f"{result['batch']} rows, JAX in {result['args'].get('floor_dtype', 'float32')}; median of {n}), "
             "and the decode throughput no decoder on those matmuls can pass (batch / floor):\n\n"
             "| matmuls of | ms per step | tokens/s at most |\n|---|---|---|\n")
    for v, f in result["floor"].items():
      text += f"| {v} | {1e3 * f['median_s']:.1f} | {f['tokens_per_s']:.0f} |\n"
  return text


def write(result: dict, out: str) -> tuple[str, str]:
  """``out`` (JSON) and the markdown table next to it (``.md``)."""
  return whole_run.write_json_md(result, out, markdown)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  js, md = write(result, args.out)
  print(markdown(result))
  print(f"wrote {js} and {md}")


if __name__ == "__main__":
  main()
