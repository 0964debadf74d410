"""Chat templates written out by hand (no jinja): SmolLM2's ChatML and Gemma's turn format.

A conversation is a sequence of ``{"role": ..., "content": ...}`` mappings, roles ``system``,
``user``, ``assistant``. Each function returns the prompt text exactly as the model's own jinja
template renders it (``tokenizer.apply_chat_template(..., tokenize=False)``).

Encode the result without adding special tokens again (``add_special_tokens=False``): the Gemma text
already starts with ``<bos>``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

Message = Mapping[str, str]

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# strings that end an assistant turn, per template (map to ids with the tokenizer)
STOP_STRINGS = {
    "chatml": ("<|im_end|>",),
    "gemma": ("<end_of_turn>", "<eos>"),
}


def chatml(messages: Sequence[Message], add_generation_prompt: bool = True,
           default_system: str | None = SMOLLM2_SYSTEM) -> str:
  """SmolLM2-Instruct's template (the GGUF's ``tokenizer.chat_template``).

  ``<|im_start|>system\\n{default_system}<|im_end|>\\n`` is inserted when the first message is not a
  system message (pass ``default_system=None`` to omit it), then
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n`` when
  ``add_generation_prompt``.
  """
  parts = []
  if messages and messages[0]["role"] != "system" and default_system is not None:
    parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
  for m in messages:
    parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)


def gemma(messages: Sequence[Message], add_generation_prompt: bool = True, bos: str = "<bos>") -> str:
  """Gemma 3's template: ``<bos><start_of_turn>user\\n{content}<end_of_turn>\\n...<start_of_turn>model\\n``.

  Role ``assistant`` is written ``model``; content is stripped of surrounding whitespace; a leading
  system message is prepended to the first user turn followed by a blank line; user and assistant
  turns must alternate, starting with user (ValueError otherwise).
  """
  prefix = ""
  turns = list(messages)
  if turns and turns[0]["role"] == "system":
    prefix = turns[0]["content"] + "\n\n"
    turns = turns[1:]
  parts = [bos]
  for i, m in enumerate(turns):
    if (m["role"] == "user") != (i % 2 == 0):
      raise ValueError("Gemma chat: conversation roles must alternate user/assistant/user/assistant/...; "
                       f"message {i} has role {m['role']!r}")
    role = "model" if m["role"] == "assistant" else m["role"]
    parts.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n")
  if add_generation_prompt:
    parts.append("<start_of_turn>model\n")
  return "".join(parts)


_TEMPLATES = {
    "chatml": chatml, "smollm2": chatml, "smollm2-135m-instruct": chatml,
    "gemma": gemma, "gemma3": gemma, "gemma3-270m": gemma,
}


def template_for(name: str) -> str:
  """Template kind (``"chatml"`` or ``"gemma"``) for a model name or family."""
  fn = _TEMPLATES.get(name.lower())
  if fn is None:
    if "gemma" in name.lower():
      return "gemma"
    raise ValueError(f"no chat template for {name!r}; known: {sorted(_TEMPLATES)}")
  return "chatml" if fn is chatml else "gemma"


def apply_chat_template(name: str, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
  """The prompt text for ``messages`` in the template of model ``name`` (see ``template_for``)."""
  kind = template_for(name)
  return (chatml if kind == "chatml" else gemma)(messages, add_generation_prompt=add_generation_prompt)


def stop_token_ids(name: str, token_to_id) -> tuple[int, ...]:
  """Ids of the strings that end an assistant turn, via ``token_to_id(str) -> int | None``."""
  ids = (token_to_id(s) for s in STOP_STRINGS[template_for(name)])
  return tuple(i for i in ids if i is not None)
