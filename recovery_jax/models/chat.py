"""Chat templates: the jinja template the model file carries, rendered with jinja2 as transformers does.

A conversation is a sequence of ``{"role": ..., "content": ...}`` mappings, roles ``system``, ``user``,
``assistant``. ``load_template(source)`` finds the template, ``render`` turns a conversation into the prompt
text exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` does:

  source                      template
  ``.gguf`` file              metadata ``tokenizer.chat_template``; bos/eos/unk/pad strings from
                              ``tokenizer.ggml.*_token_id`` (header only: ``gguf.GGUFReader`` builds every
                              field, 10-50 s for these files)
  HF folder                   ``chat_template.jinja``, else ``tokenizer_config.json`` ``chat_template`` (a
                              string, or a list of {name, template}: the ``default``); special tokens from
                              ``tokenizer_config.json`` / ``special_tokens_map.json``
  named model                 its file (``loading.resolve_named``): SmolLM2-135M-Instruct's GGUF carries ChatML
  file without a template     fallback by family (GGUF ``general.architecture`` / ``config.json`` ``model_type``
                              containing "gemma"): ``GEMMA3`` (Gemma 3 -it's template; the shipped Gemma 3
                              270M GGUF is the base model and carries none), else ``CHATML`` (SmolLM2's)
  tiny random model, family   the fallback of its family (``chatml``/``smollm2``, ``gemma``/``gemma3``)

Rendering uses jinja2's ``ImmutableSandboxedEnvironment`` with transformers' settings (trim_blocks,
lstrip_blocks, loopcontrols; globals ``raise_exception``, ``strftime_now``; a ``tojson`` that does not
escape HTML) and the special tokens as variables. A template that fails raises ``ValueError`` naming
its file. Encode the result without adding special tokens again (``add_special_tokens=False``): Gemma's
text already starts with ``<bos>``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import mmap
import os
import struct
from typing import Any, Mapping, Sequence

Message = Mapping[str, str]

# SmolLM2-135M-Instruct's template, as its GGUF carries it (tokenizer.chat_template)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma 3 -it's template (text parts), as in google/gemma-3-270m-it's tokenizer_config.json
GEMMA3 = ("{{ bos_token }}"
          "{%- if messages[0]['role'] == 'system' -%}"
          "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
          "{%- set loop_messages = messages[1:] -%}"
          "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
          "{%- for message in loop_messages -%}"
          "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{%- endif -%}"
          "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
          "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
          "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
          "{{ message['content'] | trim }}"
          "{{ '<end_of_turn>\\n' }}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")

_FALLBACKS = {
    "chatml": (CHATML, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                        "pad_token": "<|im_end|>"}, "SmolLM2-135M-Instruct's ChatML"),
    "gemma": (GEMMA3, {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
              "Gemma 3 -it's turns"),
}
_FAMILY_NAMES = {"chatml": "chatml", "smollm2": "chatml", "gemma": "gemma", "gemma3": "gemma"}

# strings that end an assistant turn, per family, besides the file's eos token (map to ids with the tokenizer)
STOP_STRINGS = {
    "chatml": ("<|im_end|>",),
    "gemma": ("<end_of_turn>", "<eos>"),
}
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A jinja chat template and the special-token strings it may use.

  text: the jinja source. source: where it came from (file and key, or the built-in fallback and why).
  family: ``"chatml"`` or ``"gemma"`` (stop strings; the fallback when the file has no template).
  special_tokens: ((name, string), ...) for ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``.
  """

  text: str
  source: str
  family: str
  special_tokens: tuple[tuple[str, str], ...] = ()


def _fallback(family: str, why: str, special: Mapping[str, str] | None = None) -> ChatTemplate:
  text, tokens, name = _FALLBACKS[family]
  tokens = {**tokens, **(special or {})}
  return ChatTemplate(text, f"built-in {family!r} template ({name}): {why}", family, tuple(sorted(tokens.items())))


# ----------------------------------------------------------------------------------------------
# reading the template from the model file

_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_GGUF_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_chat_metadata(path: str) -> dict[str, Any]:
  """The GGUF header's scalar and string key/values (arrays skipped) plus ``{name}_token`` strings for the
  ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id`` entries of ``tokenizer.ggml.tokens``."""
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    if m[:4] != b"GGUF":
      raise ValueError(f"{path}: not a GGUF file (magic {bytes(m[:4])!r}, expected b'GGUF')")
    version, _, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version not in (2, 3):
      raise ValueError(f"{path}: GGUF version {version}; expected 2 or 3 (little-endian)")

    def string(pos):
      n = struct.unpack_from("<Q", m, pos)[0]
      return m[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

    def skip_array(pos):
      kind, count = struct.unpack_from("<IQ", m, pos)
      pos += 12
      if kind in _GGUF_SIZES:
        return pos + count * _GGUF_SIZES[kind]
      for _ in range(count):
        pos = string(pos)[1] if kind == _GGUF_STRING else skip_array(pos)
      return pos

    out, pos, tokens_at = {}, 24, None
    for _ in range(n_kv):
      key, pos = string(pos)
      kind = struct.unpack_from("<I", m, pos)[0]
      pos += 4
      if kind == _GGUF_STRING:
        out[key], pos = string(pos)
      elif kind == _GGUF_ARRAY:
        if key == "tokenizer.ggml.tokens":
          tokens_at = pos
        pos = skip_array(pos)
      elif kind in _GGUF_FMT:
        out[key] = struct.unpack_from(_GGUF_FMT[kind], m, pos)[0]
        pos += _GGUF_SIZES[kind]
      else:
        raise ValueError(f"{path}: GGUF key {key!r} has value type {kind}; expected 0-12")
    ids = {f"{name}_token": out[f"tokenizer.ggml.{tid}_token_id"]
           for name, tid in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
           if f"tokenizer.ggml.{tid}_token_id" in out}
    if tokens_at is not None and ids:
      count, pos = struct.unpack_from("<Q", m, tokens_at + 4)[0], tokens_at + 12
      want = {i: [k for k, v in ids.items() if v == i] for i in set(ids.values())}
      for i in range(min(count, max(want) + 1)):
        text, pos = string(pos)
        for k in want.get(i, ()):
          out[k] = text
  return out


def _from_gguf(path: str) -> ChatTemplate:
  meta = gguf_chat_metadata(path)
  family = "gemma" if "gemma" in str(meta.get("general.architecture", "")) else "chatml"
  special = {k: meta[k] for k in _SPECIAL if k in meta}
  if "tokenizer.chat_template" not in meta:
    return _fallback(family, f"{path} has no tokenizer.chat_template", special)
  return ChatTemplate(meta["tokenizer.chat_template"], f"{path} (tokenizer.chat_template)", family,
                      tuple(sorted(special.items())))


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: {e}; expected a JSON object") from e


def _from_hf_folder(folder: str) -> ChatTemplate:
  cfg_path, tc_path = os.path.join(folder, "config.json"), os.path.join(folder, "tokenizer_config.json")
  model_type = _read_json(cfg_path).get("model_type", "") if os.path.exists(cfg_path) else ""
  family = "gemma" if "gemma" in str(model_type) else "chatml"
  tc = _read_json(tc_path) if os.path.exists(tc_path) else {}
  stm_path = os.path.join(folder, "special_tokens_map.json")
  stm = _read_json(stm_path) if os.path.exists(stm_path) else {}
  special = {}
  for k in _SPECIAL:
    v = tc.get(k, stm.get(k))
    v = v.get("content") if isinstance(v, dict) else v
    if isinstance(v, str):
      special[k] = v
  jinja_path = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return ChatTemplate(f.read(), jinja_path, family, tuple(sorted(special.items())))
  text = tc.get("chat_template")
  if isinstance(text, list):  # named templates: transformers uses "default"
    named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
    if "default" not in named:
      raise ValueError(f"{tc_path}: field 'chat_template' lists templates {sorted(map(str, named))}; expected one "
                       "named 'default'")
    text = named["default"]
  if text is None:
    return _fallback(family, f"{folder} has no chat_template.jinja and {tc_path} no 'chat_template'", special)
  if not isinstance(text, str):
    raise ValueError(f"{tc_path}: field 'chat_template' is a {type(text).__name__}; expected a jinja string")
  return ChatTemplate(text, f"{tc_path} (chat_template)", family, tuple(sorted(special.items())))


@functools.lru_cache(maxsize=16)
def _from_file(path: str, _mtime_ns: int, _size: int) -> ChatTemplate:
  return _from_gguf(path) if path.endswith(".gguf") else _from_hf_folder(path)


def load_template(source: str) -> ChatTemplate:
  """The chat template of a model: a ``.gguf`` file, a HF folder, a named model, a tiny random model or a
  family name (see the module docstring). Unknown sources raise ``ValueError``."""
  from recovery_jax.models import loading  # pylint: disable=import-outside-toplevel  # loading imports models
  if source.lower() in _FAMILY_NAMES:
    return _fallback(_FAMILY_NAMES[source.lower()], f"family {source!r} requested")
  if source in loading.TINY_MODELS:
    return _fallback("gemma" if "gemma" in source else "chatml", f"{source} is a random model with no file")
  path = loading.resolve_named(source) if source in loading.NAMED_MODELS else source
  if not (path.endswith(".gguf") and os.path.isfile(path)) and not os.path.isdir(path):
    raise ValueError(f"no chat template for {source!r}: expected an existing .gguf file or HF folder, a named model "
                     f"{loading.NAMED_MODELS}, a tiny model {tuple(loading.TINY_MODELS)} or a family "
                     f"{tuple(_FAMILY_NAMES)}")
  st = os.stat(path)
  return _from_file(path, st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------------------------
# rendering


def _raise_exception(message):
  import jinja2  # pylint: disable=import-outside-toplevel
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(text: str):
  import jinja2  # pylint: disable=import-outside-toplevel
  import jinja2.ext  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(text)


def render(template: ChatTemplate, messages: Sequence[Message], add_generation_prompt: bool = True,
           **variables) -> str:
  """The prompt text of ``messages`` (``add_generation_prompt``: end with the assistant's turn opening);
  ``variables`` are further template variables (e.g. ``tools``). A template that fails to compile or
  raises (e.g. Gemma's non-alternating roles) gives ``ValueError`` naming ``template.source``."""
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    return _compile(template.text).render(messages=[dict(m) for m in messages],
                                          add_generation_prompt=add_generation_prompt,
                                          **{**dict(template.special_tokens), **variables})
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template from {template.source} failed to render: {e}") from e


def apply_chat_template(name: str, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
  """The prompt text for ``messages`` in the template of ``name`` (``load_template``)."""
  return render(load_template(name), messages, add_generation_prompt)


def chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
  """``messages`` in the built-in ChatML fallback (SmolLM2-135M-Instruct's template)."""
  return apply_chat_template("chatml", messages, add_generation_prompt)


def gemma(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
  """``messages`` in the built-in Gemma 3 fallback (user/assistant must alternate: ValueError otherwise)."""
  return apply_chat_template("gemma", messages, add_generation_prompt)


def template_for(name: str) -> str:
  """Template family (``"chatml"`` or ``"gemma"``) of a model (``load_template``)."""
  return load_template(name).family


def stop_token_ids(name: str, token_to_id) -> tuple[int, ...]:
  """Ids of the strings that end an assistant turn (the family's and the file's eos token), via
  ``token_to_id(str) -> int | None``."""
  t = load_template(name)
  strings = dict.fromkeys(STOP_STRINGS[t.family] + tuple(v for k, v in t.special_tokens if k == "eos_token"))
  ids = (token_to_id(s) for s in strings)
  return tuple(dict.fromkeys(i for i in ids if i is not None))
