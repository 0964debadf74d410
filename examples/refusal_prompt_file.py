"""(b) A refusal defence on your own prompt file; the behaviour is a target continuation, teacher-forced.

  python examples/refusal_prompt_file.py --model path/to/model --sae path/to/saelens_sae \
      --prompts examples/prompts.jsonl --chat chatml --k 8 --value 4 --steps 100

The prompt file has one JSON object per line: ``{"prompt": ..., "target": ...}`` (``target`` optional: the
model's own greedy answer of ``--answer_tokens`` tokens is used, i.e. recovery must restore the base answer),
or plain text, one prompt a line. The repository ships benign prompts only (examples/prompts.jsonl); bring your
own file for your own study. The defence multiplies ``--k`` refusal features by ``--value`` (> 1 amplifies
them, so the defended model drifts towards refusing): ``--features`` names them, otherwise they are ranked by
the project's benign refusal contrast (the same chat prompts followed by a refusal opening vs a compliance
opening; ``tasks.refusal_features``). Recovery then looks for a delta at the last prompt token that brings the
target continuation's log-probability back while the defence stays on. Returns the verdicts from ``main``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import recovery_jax as rj
from recovery_jax.errors import UserError


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="HF folder or .gguf file (with a tokenizer)")
  p.add_argument("--sae", required=True, help="SAELens folder")
  p.add_argument("--site", default="", help="clamp site (default: the SAE's hook_name)")
  p.add_argument("--prompts", required=True, help="JSONL ({'prompt', optional 'target'}) or one prompt a line")
  p.add_argument("--chat", default="none", help="chat template for the prompts: none, chatml or gemma")
  p.add_argument("--features", default="", help="comma list of feature ids (default: the contrast's top --k)")
  p.add_argument("--k", type=int, default=8)
  p.add_argument("--value", type=float, default=4.0, help="multiplier of the refusal features")
  p.add_argument("--answer_tokens", type=int, default=16, help="length of a generated base answer")
  p.add_argument("--margin", type=float, default=1.0, help="nats: suppressed / recovered threshold")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--budget", type=float, default=0.5, help="relative budget rho: ||delta|| <= rho ||h_def||")
  p.add_argument("--projection", default="encoder")
  return p.parse_args(argv)


def read_prompts(path: str) -> tuple[list[str], list]:
  """(prompts, targets or None per prompt) from JSONL or plain text; errors name the line."""
  prompts, targets = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if line.startswith("{"):
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
          raise UserError(f"{path}:{n}: expected a non-empty string field 'prompt'")
        prompts.append(obj["prompt"])
        targets.append(obj.get("target") or None)
      else:
        prompts.append(line)
        targets.append(None)
  if not prompts:
    raise UserError(f"{path}: no prompts")
  return prompts, targets


def render(texts, chat: str) -> list[str]:
  if chat == "none":
    return list(texts)
  from recovery_jax.models import chat as chat_lib
  return [chat_lib.apply_chat_template(chat, [{"role": "user", "content": t}]) for t in texts]


def base_answers(model, prompts: list[str], n_tokens: int) -> list[list[int]]:
  """The undefended model's greedy answer ids (stopping at EOS)."""
  from recovery_jax.models import generate
  rows = rj.encode_prompts(model, prompts)
  toks, mask = generate.left_pad(rows, model.cfg.pad_token_id or 0)
  stop = tuple(model.cfg.eos_token_ids or ())
  out = np.asarray(generate.generate_jit(model.params, model.cfg, toks, mask, max_new_tokens=n_tokens,
                                         stop_tokens=stop).tokens)
  answers = []
  for row in out:
    ids = []
    for t in row.tolist():
      ids.append(t)
      if t in stop:
        break
    answers.append(ids)
  return answers


def refusal_features(model, sae, prompts: list[str], k: int) -> list[int]:
  """Top-k features of ``sae`` by the benign openings contrast (refusal vs compliance opening)."""
  from recovery_jax.tasks import refusal_features as rf
  pad = model.cfg.pad_token_id or 0
  saes = {sae.site: (sae.params, sae.cfg)}
  refuse = rf.site_means(model.params, model.cfg, rf.opening_side(model.tokenizer, prompts, rf.REFUSAL_OPENING, pad),
                         [sae.site], saes)
  comply = rf.site_means(model.params, model.cfg, rf.opening_side(model.tokenizer, prompts, rf.COMPLIANCE_OPENING, pad),
                         [sae.site], saes)
  return rf.rank(saes, refuse, comply, n_candidates=max(k, 10)).features(k).get(sae.site, [])


def main(argv=None):
  a = parse(argv)
  model = rj.load_model(a.model)
  sae = rj.load_sae(a.sae, model, site=a.site or None)
  texts, targets = read_prompts(a.prompts)
  prompts = render(texts, a.chat)
  if any(t is None for t in targets):
    generated = base_answers(model, prompts, a.answer_tokens)
    targets = [t if t is not None else g for t, g in zip(targets, generated)]
  if a.features:
    features = [int(x) for x in a.features.split(",") if x.strip()]
  else:
    features = refusal_features(model, sae, prompts, a.k)
  defence = rj.defence(sae, features, value=a.value, mode="multiply")
  behaviour = rj.Continuation(targets, margin=a.margin, max_tokens=max(a.answer_tokens, 1))
  config = rj.RecoveryConfig(steps=a.steps, lr=a.lr, budget=a.budget, budget_scale="relative",
                             projection=a.projection)
  verdicts = rj.recover(model, defence, prompts, behaviour, config=config)
  print(f"refusal defence: {len(features)} features x{a.value} at {sae.site}: {features}")
  print(rj.table(verdicts))
  return verdicts


if __name__ == "__main__":
  main(sys.argv[1:])
