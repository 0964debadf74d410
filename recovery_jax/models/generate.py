"""Batched autoregressive generation with a KV cache, as one compiled program.

Prompts are left-padded ``[batch, prompt_len]`` with an attention mask; positions are
``cumsum(mask) - 1``, so every row's first real token sits at position 0 and its generated tokens
continue from its own length. The prompt is prefilled into a KV cache once, then a
``lax.while_loop`` decodes one token per step for at most ``max_new_tokens`` steps (it exits early
when every row has stopped). Rows that emitted a stop token emit ``pad_id`` afterwards.

Interventions: ``edits`` (site -> ``fn(x, positions)``, as in ``transformer.forward``) are passed to
the prefill and to every decode step, so an edit keyed on absolute positions acts identically with
and without the cache, on prompt and generated tokens alike.

Two entry points:

- ``generate(params, cfg, tokens, ..., edits=...)``: a pure, traceable function; call it inside your
  own ``jax.jit`` (edits may close over traced arrays there).
- ``generate_jit(params, cfg, tokens, ..., make_edits=fn, edit_args=pytree)``: compiled once per static
  setting; ``make_edits(edit_args) -> edits`` is static, ``edit_args`` (clamp values, deltas, ...) are
  traced, so a sweep over edit values reuses one program.

Sampling: without a key, or with ``temperature == 0``, decoding is greedy (argmax, ties to the lowest
id); otherwise logits are divided by ``temperature`` (a traced value), optionally restricted to the
``top_k`` largest, and sampled with ``jax.random.categorical``. Each row's key for step ``i`` is ``fold_in(row_key, i)``; ``key`` is one key
(split into per-row keys) or ``[batch]`` keys (so a row's samples do not depend on its batch mates).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from recovery_jax.models.config import ModelConfig
from recovery_jax.models import transformer

Array = jax.Array
EditFn = Callable[[Array, Array], Array]


class Generation(NamedTuple):
  """tokens: [batch, max_new_tokens] new ids (``pad_id`` after a row stopped); lengths: [batch] number
  of generated tokens per row, the stop token included; done: [batch] whether the row stopped."""

  tokens: Array
  lengths: Array
  done: Array


def _row_keys(key: Array | None, batch: int) -> Array | None:
  if key is None:
    return None
  key = jnp.asarray(key)
  is_typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == 0 if is_typed else key.ndim == 1
  return jax.random.split(key, batch) if single else key


def sample_logits(logits: Array, keys: Array | None, step: Array | int, temperature: float | Array = 0.0,
                  top_k: int | None = None) -> Array:
  """Next ids [batch] from logits [batch, vocab].

  Greedy (argmax) when ``keys`` is None or ``temperature == 0``; otherwise a sample from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits, with row ``b`` drawn
  from ``fold_in(keys[b], step)``. ``temperature`` may be traced (one program serves a sweep).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if keys is None:
    if not isinstance(temperature, jax.Array) and float(temperature) != 0.0:
      raise ValueError(f"sampling with temperature={temperature} needs a PRNG key")
    return greedy
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  sampled = jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def generate(
    params,
    cfg: ModelConfig,
    tokens: Array,
    attention_mask: Array | None = None,
    key: Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float | Array = 0.0,
    top_k: int | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int | None = None,
    edits: Mapping[str, EditFn] | None = None,
    cache_dtype=jnp.float32,
) -> Generation:
  """Generates ``max_new_tokens`` tokens after left-padded prompts (pure; jit it or use generate_jit).

  Args:
    tokens: [batch, prompt_len] int ids, left-padded.
    attention_mask: [batch, prompt_len], 1 for real tokens (default: all real). Every row needs at
      least one real token.
    key: PRNG key (or [batch] keys) for sampling; None decodes greedily.
    max_new_tokens: number of decode steps (static).
    temperature: sampling temperature (may be traced); 0 is greedy.
    top_k: sample among the ``top_k`` largest logits only (static); None for all.
    stop_tokens: ids that end a row (static); the stop token itself is emitted and counted.
    pad_id: id emitted after a row stopped (default ``cfg.pad_token_id`` or 0).
    edits: site -> ``fn(x [batch, seq, d_model], positions [batch, seq]) -> x``, active at prefill and
      at every decode step.

  Returns:
    ``Generation(tokens [batch, max_new_tokens], lengths [batch], done [batch])``.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  pad = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
  stops = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)
  keys = _row_keys(key, b)
  edits = dict(edits or {})

  positions = transformer.default_positions(attention_mask, b, t)
  cache = transformer.init_cache(cfg, b, t + max_new_tokens, dtype=cache_dtype)
  # logits of the last prompt position only ([B, 1, V], not [B, T, V]: Gemma's vocabulary is 262k),
  # unless an edit acts on the final norm's output, which needs the forward's own unembedding
  full_logits = "ln_final.hook_normalized" in edits
  out = transformer.forward(params, cfg, tokens, attention_mask=attention_mask, positions=positions,
                            cache=cache, edits=edits, compute_logits=full_logits)
  if full_logits:
    last_logits = out.logits[:, -1:]
  else:
    last_logits = transformer.final_logits(params, cfg, out.resid[:, -1:])
  next_pos = positions[:, -1] + 1  # [B] position of the first generated token

  def emit(i, logits, done, out_tokens, lengths):
    tok = sample_logits(logits[:, -1], keys, i, temperature, top_k)
    tok = jnp.where(done, pad, tok)
    out_tokens = out_tokens.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stops)
    return tok, done, out_tokens, lengths

  out_tokens = jnp.full((b, max_new_tokens), pad, jnp.int32)
  tok, done, out_tokens, lengths = emit(0, last_logits, jnp.zeros((b,), bool), out_tokens,
                                        jnp.zeros((b,), jnp.int32))

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tok, cache, done, out_tokens, lengths = state
    step = transformer.forward(params, cfg, tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                               positions=(next_pos + i - 1)[:, None], cache=cache, edits=edits)
    tok, done, out_tokens, lengths = emit(i, step.logits, done, out_tokens, lengths)
    return i + 1, tok, step.cache, done, out_tokens, lengths

  state = (jnp.asarray(1, jnp.int32), tok, out.cache, done, out_tokens, lengths)
  _, _, _, done, out_tokens, lengths = jax.lax.while_loop(cond, body, state)
  return Generation(out_tokens, lengths, done)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "stop_tokens",
                                             "pad_id", "make_edits", "cache_dtype"))
def generate_jit(
    params,
    cfg: ModelConfig,
    tokens: Array,
    attention_mask: Array | None = None,
    key: Array | None = None,
    edit_args=None,
    temperature: float | Array = 0.0,
    *,
    max_new_tokens: int,
    top_k: int | None = None,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int | None = None,
    make_edits: Callable[..., Mapping[str, EditFn]] | None = None,
    cache_dtype=jnp.float32,
) -> Generation:
  """``generate`` compiled; edits are ``make_edits(edit_args)`` (static builder, traced arguments).

  ``stop_tokens`` must be a tuple (hashable). Recompiles only when a static argument or an input
  shape changes.
  """
  edits = make_edits(edit_args) if make_edits is not None else None
  return generate(params, cfg, tokens, attention_mask, key, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, stop_tokens=stop_tokens, pad_id=pad_id, edits=edits,
                  cache_dtype=cache_dtype)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None) -> tuple[Array, Array]:
  """Left-pads token id lists into (tokens [batch, length], attention_mask [batch, length])."""
  length = max(len(r) for r in rows) if length is None else length
  if any(len(r) > length for r in rows):
    raise ValueError(f"left_pad: a row is longer than length={length}")
  toks = [[pad_id] * (length - len(r)) + list(r) for r in rows]
  mask = [[0] * (length - len(r)) + [1] * len(r) for r in rows]
  return jnp.asarray(toks, jnp.int32), jnp.asarray(mask, jnp.int32)


# ----------------------------------------------------------------------------------------------
# stop tokens

STOP_OPTIONS = ("eos", "eos+end_of_turn")
# per chat-template family (``chat.template_for``): the tokenizer's eos token and the token that ends an
# assistant turn (ChatML ends both with <|im_end|>; Gemma's turn ends with <end_of_turn>, the text with <eos>)
EOS_TOKEN = {"chatml": "<|im_end|>", "gemma": "<eos>"}
END_OF_TURN_TOKEN = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>"}


def stop_ids(option: str, family: str, token_to_id: Callable[[str], int | None], eos_ids: Sequence[int] = (),
             eos_token: str | None = None) -> tuple[int, ...]:
  """The sorted ids that end generation under ``option`` (a config's ``generation.stop``).

  ``eos``: the tokenizer's eos token alone (``eos_token``, default the family's: ``<eos>`` for Gemma,
  ``<|im_end|>`` for ChatML), as TransformerLens' ``stop_at_eos`` and the paper's refusal generation
  (paper-method 6.1, Q23): a Gemma answer runs on past ``<end_of_turn>``. A config eos id that is the
  end-of-turn token (gemma-2-2b-it's ``eos_token_id`` is [1, 107]) is left out; the config's eos ids
  stand in only when the tokenizer has no eos token.
  ``eos+end_of_turn`` (corrected): also the family's end-of-turn token and every config eos id.
  ``token_to_id(str) -> int | None`` is the tokenizer's; ``family`` is ``"chatml"`` or ``"gemma"``.
  """
  if option not in STOP_OPTIONS:
    raise ValueError(f"stop option {option!r}: expected one of {STOP_OPTIONS}")
  if family not in EOS_TOKEN:
    raise ValueError(f"chat template family {family!r}: expected one of {tuple(EOS_TOKEN)}")
  eos = token_to_id(eos_token or EOS_TOKEN[family])
  turn = token_to_id(END_OF_TURN_TOKEN[family])
  if option == "eos":
    ids = {eos} if eos is not None else {int(i) for i in eos_ids} - {turn}
  else:
    ids = {eos, turn} | {int(i) for i in eos_ids}
  return tuple(sorted(i for i in ids if i is not None))
