"""Bad inputs end in one clear error, never a traceback or a silent wrong run: one table per entry
point (the absl app's config errors, the workdir's owner, the prompt / question / data / feature
readers); each case is (bad input, expected error class, words the message must hold).

No case loads a model: the app's cases fail during flag parsing or before the experiment starts.
"""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from recovery_jax import config_utils, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IOI = f"--config={ROOT}/configs/ioi.py"


# ----------------------------------------------------------------------------------------------
# the absl app: config errors (subprocess; each fails in flag parsing or before the experiment)

APP_CASES = [  # (flags, words of the one "error:" line)
    ([f"{IOI}:tiny", "--config.recovery.stpes=5"], ["--config.recovery.stpes", "did you mean 'recovery.steps'"]),
    ([f"{IOI}:tiny", "--config.recovery.steps=abc"], ["--config.recovery.steps=abc", "expected an int"]),
    ([f"{IOI}:tinyy"], ["unknown variant 'tinyy'", "did you mean 'tiny'"]),
    ([f"{IOI}:tiny,stpes=3"], ["config arg 'stpes'", "did you mean 'steps'"]),
    ([f"{IOI}:tiny", "--config.experiment=ioii"], ["'ioii' is not a known experiment", "did you mean 'ioi'"]),
]


@pytest.mark.parametrize("flags,words", APP_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_app_config_errors_are_one_line(tmp_path, flags, words):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "recovery_jax.main", *flags, f"--workdir={tmp_path / 'wd'}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert all(w in lines[0] for w in words), lines[0]


# ----------------------------------------------------------------------------------------------
# config_utils: config-file args and overrides name the nearest valid names

CONFIG_CASES = [  # (call, error class, words)
    (lambda: config_utils.parse_arg("stpes=3", steps=0, variant="default"), ValueError,
     ["'stpes'", "did you mean 'steps'", "known: steps, variant"]),
    (lambda: config_utils.parse_arg("grdi", steps=0, grid=False), ValueError, ["'grdi'", "did you mean 'grid'"]),
    (lambda: config_utils.parse_arg("steps=x", steps=0), ValueError, ["steps='x'", "expected an int"]),
    (lambda: config_utils.load_config_file("configs/ioi.py:tiny", ["recovery.stpes=5"], root=ROOT), ValueError,
     ["no field 'recovery.stpes'", "did you mean 'recovery.steps'"]),
    (lambda: config_utils.check_choice("configs/x.py: variant", "tinyy", ("default", "tiny")), errors.UserError,
     ["variant 'tinyy'", "did you mean 'tiny'"]),
]


@pytest.mark.parametrize("call,cls,words", CONFIG_CASES)
def test_config_utils_errors(call, cls, words):
  with pytest.raises(cls) as e:
    call()
  assert all(w in str(e.value) for w in words), str(e.value)


# ----------------------------------------------------------------------------------------------
# workdir ownership: one config per workdir, one process at a time

def _cfg(steps: int):
  return ml_collections.ConfigDict({"experiment": "ioi", "seed": 0, "recovery": {"steps": steps}})


def _other_config_run(wd):
  from recovery_jax import workdir  # pylint: disable=import-outside-toplevel
  workdir.claim(str(wd), _cfg(5), writer=True)
  (wd / "results.jsonl").write_text("{}\n")
  return lambda: workdir.claim(str(wd), _cfg(50), writer=True)


def _legacy_runner_workdir(wd):
  """A workdir of the shared runner from before config.sha256: config.json only."""
  from recovery_jax.experiments import runner  # pylint: disable=import-outside-toplevel
  wd.mkdir()
  (wd / "config.json").write_text(_cfg(5).to_json(indent=2, sort_keys=True))
  return lambda: runner.snapshot_config(_cfg(50), str(wd))


def _train_sae_workdir_of_another_config(wd):
  """train_sae on a workdir made under another config: refused before anything loads."""
  from recovery_jax.experiments import train_sae  # pylint: disable=import-outside-toplevel
  spec = config_utils.load_config_file("configs/train_sae.py:smoke", root=ROOT)
  other = config_utils.load_config_file("configs/train_sae.py:smoke", ["seed=1"], root=ROOT)
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(spec.to_dict(), indent=1, sort_keys=True, default=str))
  return lambda: train_sae.run(other, str(wd))


def _not_a_run(wd):
  """--overwrite never removes a folder that is not a run (a model folder's config.json)."""
  from recovery_jax import workdir  # pylint: disable=import-outside-toplevel
  wd.mkdir()
  (wd / "config.json").write_text('{"model_type": "llama"}')
  return lambda: workdir.claim(str(wd), _cfg(5), writer=True, overwrite=True)


WORKDIR_CASES = [  # (setup(workdir) -> the failing call, error class, words)
    (_other_config_run, errors.UserError,
     ["holds a run of a different config", "recovery.steps: 5 -> 50", "--overwrite"]),
    (_legacy_runner_workdir, errors.UserError, ["holds a run of a different config", "recovery.steps: 5 -> 50"]),
    (_train_sae_workdir_of_another_config, errors.UserError, ["holds a run of a different config", "seed: 0 -> 1"]),
    (_not_a_run, errors.UserError, ["not a recovery_jax run", "another --workdir"]),
]


@pytest.mark.parametrize("setup,cls,words", WORKDIR_CASES, ids=lambda x: getattr(x, "__name__", None))
def test_workdir_errors(tmp_path, setup, cls, words):
  call = setup(tmp_path / "wd")
  with pytest.raises(cls) as e:
    call()
  assert all(w in str(e.value) for w in words), str(e.value)


def test_workdir_same_config_resumes_overwrite_clears_and_non_writers_write_nothing(tmp_path):
  from recovery_jax import workdir  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "wd"
  workdir.claim(str(wd), _cfg(5), writer=True)
  (wd / "results.jsonl").write_text("{}\n")
  workdir.claim(str(wd), _cfg(5), writer=True)  # the same config: resumes, nothing removed
  assert (wd / "results.jsonl").exists()
  workdir.claim(str(wd), _cfg(5), writer=False)
  with pytest.raises(errors.UserError, match="different config"):
    workdir.claim(str(wd), _cfg(50), writer=False)  # other processes check too
  workdir.allow_overwrite(str(tmp_path))  # --overwrite covers the workdir and folders under it
  workdir.claim(str(wd), _cfg(50), writer=True)
  assert sorted(os.listdir(wd)) == [".lock", "config.sha256"]
  other = tmp_path / "reader"
  workdir.claim(str(other), _cfg(5), writer=False)  # a non-writer neither locks nor writes
  assert not other.exists()


def test_second_process_in_a_workdir_fails_at_once_naming_the_first(tmp_path):
  from recovery_jax import workdir  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path / "wd")
  code = ("import sys, time; from recovery_jax import workdir; workdir.lock(sys.argv[1]); print('locked', flush=True);"
          " time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code, wd], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(errors.UserError, match=f"in use by process {holder.pid} on host"):
      workdir.claim(wd, _cfg(5), writer=True)
  finally:
    holder.kill()
    holder.wait(timeout=30)
  workdir.claim(wd, _cfg(5), writer=True)  # the kernel dropped the dead holder's lock: no stale lock


# ----------------------------------------------------------------------------------------------
# input files: prompts (refusal), questions (unlearning), SAEBench rows (TPP), feature lists

def _refusal(path):
  from recovery_jax.tasks import refusal  # pylint: disable=import-outside-toplevel
  return refusal.load_prompts(path)


def _questions(path):
  from recovery_jax.tasks import unlearning  # pylint: disable=import-outside-toplevel
  return unlearning.load_questions(path)


def _tpp(path):
  from recovery_jax.tasks import tpp  # pylint: disable=import-outside-toplevel
  return tpp.load_saebench_file(path, None, classes=("a", "b"), text_field="text", label_field="label", n_train=1,
                                n_test=1, bos_id=None, pad_id=0)


def _features(path):
  from recovery_jax.tasks import refusal_features  # pylint: disable=import-outside-toplevel
  with open(path, encoding="utf-8") as f:
    return refusal_features.parse_feature_list(f.read(), ["blocks.12.hook_resid_post"])


Q = '{"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": "A"}\n'
HUGE = 50_001  # one row over the readers' cap

FILE_CASES = [  # (reader, file name, bytes, error class, words)
    (_refusal, "p.jsonl", b'{"instruction": "caf\xe9"}\n', errors.UserError, ["p.jsonl, line 1", "not UTF-8"]),
    (_refusal, "p.csv", b"goal\nok\ncaf\xe9\n", errors.UserError, ["p.csv, line 3", "not UTF-8"]),
    (_refusal, "p.jsonl", b'{"instruction": "ok"}\n{"instruction": \n', errors.UserError,
     ["p.jsonl, line 2", "not valid JSON", "expected one JSON object per line"]),
    (_refusal, "p.jsonl", b'{"instruction": "ok"}\n{"text": "x"}\n', errors.UserError,
     ["p.jsonl, line 2", "none of the fields"]),
    (_refusal, "p.jsonl", b"", errors.UserError, ["p.jsonl", "no instructions", "expected one JSON object"]),
    (_refusal, "p.jsonl", b'"x"\n' * HUGE, errors.UserError, ["p.jsonl, line 50001", "more than 50000 rows", "n_prompts"]),
    (_questions, "q.jsonl", Q.encode() + b'{"question": "\xff"}\n', errors.UserError, ["q.jsonl, line 2", "not UTF-8"]),
    (_questions, "q.jsonl", Q.encode() + b"{bad\n", errors.UserError, ["q.jsonl, row 2", "not valid JSON", "expected one JSON object per line"]),
    (_questions, "q.jsonl", Q.encode() + b'{"question": "x", "answer": 0}\n', errors.UserError,
     ["q.jsonl, row 2", "missing field 'choices'"]),
    (_questions, "q.jsonl", b"\n\n", errors.UserError, ["q.jsonl", "holds no questions", "expected"]),
    (_questions, "q.jsonl", Q.encode() * HUGE, errors.UserError, ["q.jsonl, line 50001", "more than 50000 rows"]),
    (_tpp, "d.jsonl", b'{"text": "\xe9t\xe9", "label": "a"}\n', errors.UserError, ["d.jsonl, line 1", "not UTF-8"]),
    (_tpp, "d.jsonl", b'{"text": "x", "label": "a"}\n{"text": "y"\n', errors.UserError,
     ["d.jsonl, line 2", "not valid JSON"]),
    (_tpp, "d.jsonl", b'{"text": "x"}\n', errors.UserError, ["d.jsonl: row at line 1", "no field 'label'"]),
    (_tpp, "d.jsonl", b"", errors.UserError, ["d.jsonl: no rows", "expected rows with fields 'text' and 'label'"]),
    (_features, "f.txt", b" , \n", ValueError, ["has no entries", "expected layer:feature"]),
    (_features, "f.txt", b"12:-3", ValueError, ["'12:-3'", "negative"]),
    (_features, "f.txt", b"12:x", ValueError, ["'12:x'", "expected layer:feature"]),
]


@pytest.mark.parametrize("reader,name,data,cls,words", FILE_CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(FILE_CASES)])
def test_file_reader_errors(tmp_path, reader, name, data, cls, words):
  path = tmp_path / name
  path.write_bytes(data)
  with pytest.raises(cls) as e:
    reader(str(path))
  assert all(w in str(e.value) for w in words), str(e.value)


def test_huge_prompt_file_with_a_limit_streams_only_what_it_needs(tmp_path):
  from recovery_jax.tasks import refusal  # pylint: disable=import-outside-toplevel
  path = tmp_path / "p.jsonl"
  path.write_bytes(b'"x"\n' * 200_000)
  assert len(refusal.load_prompts(str(path), 5)) == 5
