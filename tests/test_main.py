"""The entry point: experiments by name, config files from any directory, workdir checks, quiet logs."""

import logging
import os
import subprocess
import sys

import pytest

from recovery_jax import config_docs, config_utils, errors, experiments, main


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--config={ROOT}/configs/ioi.py:tiny"


def _main(cwd, *args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "recovery_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _user_error(proc, *words):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert all(w in proc.stderr for w in words), proc.stderr[-3000:]


@pytest.mark.slow  # an app subprocess (make test, not make test-fast)
def test_tiny_ioi_runs_from_another_directory_with_a_short_log(tmp_path):
  wd = tmp_path / "run"
  proc = _main(tmp_path, TINY, f"--workdir={wd}", "--config.recovery.steps=2")
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  assert (wd / "summary.md").exists() and (wd / "results.jsonl").exists()
  lines = (proc.stdout + proc.stderr).splitlines()
  assert not [l for l in lines if "checkpoint_manager.py" in l or "compilation_cache.py" in l], lines
  assert len(lines) < 60, "\n".join(lines)


@pytest.mark.slow  # an app subprocess (make test, not make test-fast)
def test_unknown_experiment_lists_the_known_ones(tmp_path):
  assert {"ioi", "train_sae"} <= set(experiments.names()) and "runner" not in experiments.names()
  proc = _main(tmp_path, TINY, "--config.experiment=nope", f"--workdir={tmp_path / 'run'}")
  _user_error(proc, "'nope'", "ioi", "train_sae")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # an app subprocess (make test, not make test-fast)
def test_workdir_under_a_regular_file_is_a_clear_error(tmp_path):
  (tmp_path / "file").write_text("x")
  wd = tmp_path / "file" / "run"
  _user_error(_main(tmp_path, TINY, f"--workdir={wd}"), str(wd), f"{tmp_path / 'file'} is a file, not a directory")
  _user_error(_main(tmp_path, TINY, f"--workdir={tmp_path / 'file'}"), "exists and is not a directory")


def test_check_workdir_creates_probes_and_rejects_unwritable(tmp_path):
  wd = tmp_path / "a" / "b"
  main.check_workdir(str(wd))
  assert wd.is_dir() and not os.listdir(wd)  # the probe file is removed
  if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new files even to root
    ro = "/sys"
  else:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
  with pytest.raises(errors.UserError, match=f"--workdir='{ro}' is not writable"):
    main.check_workdir(str(ro))


def test_library_info_records_are_hidden_unless_verbose():
  lib = logging.LogRecord("orbax", logging.INFO, "/site-packages/orbax/checkpoint_manager.py", 1, "saved", None, None)
  own = logging.LogRecord("absl", logging.INFO, os.path.join(ROOT, "recovery_jax", "sae", "pipeline.py"), 1, "step",
                          None, None)
  warn = logging.LogRecord("jax", logging.WARNING, "/site-packages/jax/_src/x.py", 1, "careful", None, None)
  root = logging.getLogger()
  quiet, verbose = logging.Handler(), logging.Handler()
  before = {h: list(h.filters) for h in root.handlers}
  try:
    root.addHandler(quiet)
    main.quiet_library_logging(0)
    root.removeHandler(quiet)
    root.addHandler(verbose)
    main.quiet_library_logging(1)
  finally:
    for h in (quiet, verbose):
      root.removeHandler(h)
    for h, fs in before.items():
      h.filters[:] = fs
  assert [bool(quiet.filter(r)) for r in (lib, own, warn)] == [False, True, True]
  assert all(verbose.filter(r) for r in (lib, own, warn))


# --- a CLI that explains itself: --list, --describe, --help (no experiment runs, no JAX) --------------

CONFIGS = config_docs.config_files()


def _variants_or_default(path):
  variants, _ = config_docs.accepted_args(path)
  return [f"{path}:{v}" for v in variants] or [str(path)]


def test_list_shows_every_experiment_config_and_variant_with_its_line():
  text = config_docs.listing()
  assert {"demo", "ioi", "refusal", "tpp", "train_sae", "unlearning"} <= set(experiments.names())
  for name in experiments.names():
    assert f"\n{name}  {experiments.one_line(name)[:30]}" in text, name
  assert "(no config file" not in text and "not described" not in text and "not a known experiment" not in text, text
  for path in CONFIGS:
    doc = config_docs.file_doc(path)
    variants, keys = config_docs.accepted_args(path)
    assert doc.experiment in experiments.names() and doc.summary, path
    documented = [e.name for e in doc.entries]
    assert set(variants) <= set(documented), (path, variants, documented)  # every variant the code accepts
    assert all(e.key in set(variants) | set(keys) for e in doc.entries), (path, documented, variants, keys)
    for e in doc.entries:
      assert f"    {e.name} " in text and e.text.split()[0] in text, (path, e)
  assert "    tiny     a random-weight tiny llama + random SAE (CI smoke test; seconds)" in text


def test_every_top_level_field_of_every_config_has_a_description():
  assert len(CONFIGS) >= 7
  for path in CONFIGS:
    docs = config_docs.field_docs(path)
    for spec in _variants_or_default(path):
      cfg = config_utils.load_config_file(spec)
      assert config_docs.undocumented(cfg, docs) == [], (f"{spec}: top-level fields without a comment next to "
                                                         "their first assignment in get_config")


def test_field_docs_come_from_the_comments_next_to_each_field(tmp_path):
  (tmp_path / "a.py").write_text('''"""Config A.

Variants:
  one  the first
       (continued)
  two  the second
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = "ioi"
  # the block above
  # in two lines
  c.alpha = 1
  c.beta = 2  # at the end of the line

  c.gamma = 3
  c.grp = ml_collections.ConfigDict()  # a group
  c.grp.x = "v"  # inside the group
  if arg == "two":
    c.gamma = 4  # a variant's comment is not the field's meaning
  return c
''')
  (tmp_path / "b.py").write_text('import ml_collections\n\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict()\n'
                                 '  c.experiment = "ioi"\n  c.gamma = 5\n  c.delta = 1  # own\n  return c\n')
  docs = config_docs.field_docs(tmp_path / "a.py")
  assert docs["alpha"] == "the block above in two lines" and docs["beta"] == "at the end of the line"
  assert "gamma" not in docs and docs["grp"] == "a group" and docs["grp.x"] == "inside the group"
  assert docs["experiment"] == config_docs.COMMON_FIELDS["experiment"]
  doc = config_docs.file_doc(tmp_path / "a.py")
  assert doc.experiment == "ioi" and doc.summary == "Config A."
  assert [(e.name, e.text) for e in doc.entries] == [("one", "the first (continued)"), ("two", "the second")]
  assert config_docs.field_docs(tmp_path / "b.py")["alpha"] == "the block above in two lines"  # same experiment
  cfg = config_utils.load_config_file(str(tmp_path / "a.py"))
  assert config_docs.undocumented(cfg, docs) == ["gamma"]
  text = config_docs.describe(cfg, docs, config_docs.field_order(tmp_path / "a.py"))
  assert [l.split()[0] for l in text.splitlines() if not l.startswith(" " * 40)] == [
      "experiment", "alpha", "beta", "gamma", "grp:", "x"]


def test_describe_shows_values_and_meanings_with_overrides():
  text = main.describe_text([f"--config={ROOT}/configs/ioi.py:tiny", "--config.recovery.steps=3"])
  lines = text.splitlines()
  assert lines[0].startswith(f"{ROOT}/configs/ioi.py:tiny  (experiment 'ioi'): IOI post-intervention recovery.")
  assert any(l.startswith("  steps = 3") for l in lines), text
  assert any(l.startswith("  prompt_type = 'mixed'") and l.endswith("BABA, ABBA or mixed") for l in lines), text
  assert any(l.startswith("model = 'tiny-random-llama'") and "HF folder" in l for l in lines), text
  for path in CONFIGS:  # every config and variant describes itself
    for spec in _variants_or_default(path):
      assert main.describe_text([f"--config={spec}"]).count("\n") > 10, spec


@pytest.mark.parametrize("args, words", [
    (["--config=configs/ioi.py:tiyn"], ["unknown variant 'tiyn'", "did you mean 'tiny'", "default, paper, sweep or tiny"]),
    (["--config=configs/train_sae.py:smoek"], ["'smoek'", "did you mean 'smoke'"]),
    (["--config=configs/ioi.py", "--config.recovery.step=3"], ["'recovery.step'", "did you mean 'recovery.steps'"]),
    (["--config=configs/iio.py"], ["configs/iio.py does not exist", "did you mean 'ioi.py'"]),
    (["--config=configs/ioi.py", "--config.experiment=ioii"], ["'ioii' is not a known experiment", "did you mean 'ioi'"]),
    ([], ["--describe needs --config"]),
])
def test_unknown_variant_field_file_or_experiment_names_the_nearest(args, words, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert main.answer_info_request(["main", *args, "--describe"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
  if args and "--config.experiment=ioii" not in args and args != ["--config=configs/iio.py"]:
    assert all(w in main.flag_error_message(args + ["--workdir=x"], ValueError("x")) for w in words[:2])
  with pytest.raises(errors.UserError, match="did you mean 'ioi'"):
    experiments.load("ioii")
  with pytest.raises(ValueError, match=r"expected default, paper, sweep or tiny \(did you mean 'tiny'\?\)"):
    config_utils.load_config_file(f"{ROOT}/configs/ioi.py:tiyn")  # the Python loader names it too


def test_help_and_list_are_answered_before_flag_parsing(capsys):
  assert main.answer_info_request(["main", "--config=x", "--workdir=y"]) is None  # a run: absl parses it
  assert main.answer_info_request(["main", "list"]) == 0
  listed = capsys.readouterr().out
  assert listed == config_docs.listing()
  assert main.answer_info_request(["main", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(main.__doc__.strip()[:60]) and listed in out
  assert all(f"--{f}:" in out for f in ("config", "workdir", "overwrite", "list", "describe")), out


@pytest.mark.slow  # a subprocess (make test, not make test-fast)
def test_cli_help_list_and_describe_exit_zero_without_importing_jax(tmp_path):
  code = ("import sys\nfrom recovery_jax import main\n"
          "for argv in (['m', '--help'], ['m', '--list'], ['m', 'list'], ['m', '--config=configs/ioi.py:tiny', '--describe']):\n"
          "  assert main.answer_info_request(argv) == 0, argv\n"
          "print('JAX_IMPORTED', 'jax' in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "JAX_IMPORTED False" in proc.stdout, proc.stderr[-3000:]
  for args in (["--help"], ["list"]):
    proc = _main(tmp_path, *args, timeout=120)
    assert proc.returncode == 0 and "unlearning" in proc.stdout and "topk12" in proc.stdout, proc.stderr[-3000:]
  _user_error(_main(tmp_path, f"--config={ROOT}/configs/ioi.py:tiyn", "--describe", timeout=120), "did you mean 'tiny'")
