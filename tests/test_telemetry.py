"""Watching and reproducing a run without running one: TensorBoard events read back with
TensorBoard's own reader, the per-phase profile and its compile count, the manifest's cached file
hashes, the progress-bar switches, and the profile section of a re-rendered summary (the app-level
checks of the same files ride on the IOI app test: tests/test_ioi_app.py)."""

import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax import manifest, profile, sweep, telemetry
from recovery_jax.experiments import runner


def read_events(folder):
  """{tag: [(step, value)]} of one TensorBoard run folder, read by tensorboard's EventAccumulator."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(folder))
  acc.Reload()
  return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _rows(n, recovered, valid):
  return [{"point_id": 0, "example": i, "valid": valid[i], "recovered": recovered[i], "diverged": False,
           "delta_norm": float(i), "text": "a benign prompt"} for i in range(n)]


def test_event_log_writes_units_and_curves_that_tensorboard_reads_back(tmp_path):
  (tmp_path / "tensorboard" / "stale").mkdir(parents=True)  # a folder from an earlier run is cleared
  log = telemetry.EventLog(str(tmp_path))
  curves = [{"point_id": 3, "grid_id": 0, "name": "none (shared)", "objective": [1.0, 2.0, 3.0],
             "delta_norm": [0.5, 0.6, 0.7], "drift_l2": [0.0, 0.1, float("nan")]}]
  log.unit(0, _rows(4, [True, True, False, True], [True, True, True, False]), curves, seconds=1.5)
  log.unit(1, _rows(2, [False, False], [True, True]), [], seconds=None)
  log.close()
  runs = sorted(os.listdir(tmp_path / "tensorboard"))
  assert runs == ["p0003 none (shared)", "units"]
  units = read_events(tmp_path / "tensorboard" / "units")
  assert units["unit/recovered_fraction"] == [(0, pytest.approx(2 / 3)), (1, 0.0)]  # recovered among valid
  assert units["unit/n_rows"] == [(0, 4.0), (1, 2.0)]
  assert units["unit/delta_norm"] == [(0, 1.5), (1, 0.5)]
  assert units["unit/seconds"] == [(0, 1.5)]  # a unit read back from the store has no time
  assert "unit/text" not in units and "unit/example" not in units
  curve = read_events(tmp_path / "tensorboard" / "p0003 none (shared)")
  assert sorted(curve) == ["curve/delta_norm", "curve/drift_l2", "curve/objective"]
  assert curve["curve/objective"] == [(0, 1.0), (1, 2.0), (2, 3.0)]
  assert [s for s, _ in curve["curve/drift_l2"]] == [0, 1]  # a non-finite value is left out
  off = tmp_path / "off"
  telemetry.EventLog(str(off), enabled=False).unit(0, _rows(1, [True], [True]), curves)
  assert not off.exists()


def test_profile_phases_add_up_and_compiles_are_counted(tmp_path):
  x = jnp.arange(7.0) + 0.5
  x.block_until_ready()

  @profile.timed("generation", inside={"load": "preflight"})
  def gen():
    time.sleep(0.02)

  prof = profile.Profile()
  with profile.active(prof):
    with profile.phase("load"):
      time.sleep(0.05)
      gen()  # inside load: preflight
      with profile.phase("recovery"):
        f = jax.jit(lambda v: jnp.cumsum(jnp.sin(v) * 3.25))  # a new program: traced and compiled here
        f(x).block_until_ready()
        f(x).block_until_ready()  # cached: no second compile
    with profile.phase("evaluation"):
      gen()  # elsewhere: generation
  res = prof.result()
  ph = {k: v["seconds"] for k, v in res["phases"].items()}
  assert ph["load"] >= 0.045 and ph["preflight"] >= 0.015 and ph["generation"] >= 0.015
  assert ph["compile"] > 0 and res["compile_in"]["recovery"] > 0
  assert sum(ph.values()) == pytest.approx(res["wall_s"], abs=0.01)  # exclusive times add up to the wall time
  assert ph["other"] < 0.05
  c = res["compilations"]
  assert c["programs"] >= 1 and c["traces"] >= 1 and c["compiled"] + c["persistent_cache_hits"] == c["programs"]
  assert any("lambda" in t["function"] for t in c["top"])
  n = c["programs"]
  with profile.active(prof):
    with profile.phase("recovery"):
      f(x).block_until_ready()
  assert prof.result()["compilations"]["programs"] == n
  assert list(res["phases"])[:2] == ["load", "compile"]  # PHASES order
  table = profile.table(res)
  assert table.startswith(profile.SECTION_TITLE) and "| preflight" in table and "XLA programs" in table
  with profile.phase("nothing active"):  # no profile: a no-op
    pass


def test_manifest_hashes_are_cached_by_path_size_and_mtime(tmp_path):
  cache = str(tmp_path / "cache" / "sha256.json")
  f = tmp_path / "weights.safetensors"
  f.write_bytes(b"abc" * 1000)
  want = hashlib.sha256(b"abc" * 1000).hexdigest()
  assert manifest.sha256_file(str(f), cache) == want
  entries = json.loads(open(cache).read())
  (key,) = entries
  entries[key] = "cached"  # a second call must not read the file again
  open(cache, "w").write(json.dumps(entries))
  assert manifest.sha256_file(str(f), cache) == "cached"
  st = os.stat(f)
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file is hashed again
  assert manifest.sha256_file(str(f), cache) == want
  assert len(json.loads(open(cache).read())) == 1  # the stale entry of that file is dropped
  (tmp_path / "cfg.json").write_text("{}")
  (tmp_path / "notes.md").write_text("not read by a loader")
  assert [os.path.basename(p) for p in manifest.files_of(str(tmp_path))] == ["cfg.json", "weights.safetensors"]


def test_manifest_records_files_seeds_and_refusal_detectors(tmp_path):
  sae = tmp_path / "sae"
  sae.mkdir()
  (sae / "cfg.json").write_text("{}")
  manifest.begin()
  manifest.record("model", "tiny-random-llama", None, random_weights_seed=3)
  manifest.record("sae", str(sae), str(sae), site="blocks.1.hook_resid_post")
  manifest.record("sae", str(sae), str(sae), site="blocks.1.hook_resid_post")  # loaded twice: noted once
  cfg = {"experiment": "refusal", "seed": 3, "task": {"prompt_seed": 5}, "judge_model": ""}
  m = manifest.build(cfg, "refusal", cache=str(tmp_path / "c.json"))
  assert [e["kind"] for e in m["files"]] == ["model", "sae"]
  assert m["files"][1]["files"] == [{"name": "cfg.json", "bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}]
  assert m["seeds"] == {"seed": 3, "task.prompt_seed": 5}
  assert m["judge"]["config"] == {"judge_model": ""}
  assert m["judge"]["detectors"]["module"] == "recovery_jax.tasks.refusal_judge"
  assert m["versions"]["jax"] == jax.__version__ and m["devices"]["count"] == jax.device_count()
  assert m["config"] == cfg
  manifest.begin()
  assert manifest.loaded() == []


def test_progress_bars_quiet_off_a_terminal_by_switch_and_by_verbosity(monkeypatch):
  from absl import logging  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
  assert not telemetry.bars_enabled() and telemetry.batch_progress() is None
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  old = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    assert telemetry.bars_enabled()
    with telemetry.progress(False):
      assert not telemetry.bars_enabled()
    logging.set_verbosity(logging.ERROR)
    assert not telemetry.bars_enabled()
  finally:
    logging.set_verbosity(old)


def test_run_units_reports_every_unit_once_resumed_or_computed(tmp_path):
  units = sweep.make_units(sweep.expand_grid({"x": [1, 2, 3]}), ("x",), 1)
  store = sweep.UnitStore(str(tmp_path / "units"))
  seen = []
  compute = lambda u: {"y": np.asarray([u.points[0]["x"] * 2.0])}
  sweep.run_units(units[:2], compute, store, log=lambda m: None, on_result=lambda u, r, s: seen.append((u.unit_id, s)))
  sweep.run_units(units, compute, store, log=lambda m: None,
                  on_result=lambda u, r, s: seen.append((u.unit_id, s, float(r["y"][0]))))
  store.close()
  assert [s[0] for s in seen] == [0, 1, 0, 1, 2]
  assert seen[2][1] is None and seen[3][1] is None and seen[4][1] is not None  # resumed: no time
  assert [s[2] for s in seen[2:]] == [2.0, 4.0, 6.0]


class _Setting:
  name = "fake"

  def render(self, workdir, plots=True):
    """Writes summary.md once, then keeps it as it is (as refusal keeps a finished run's summary)."""
    del plots
    path = os.path.join(workdir, "summary.md")
    if not os.path.exists(path):
      open(path, "w").write("# Summary\n\nrows\n")
    return "# Summary\n\nrows\n"


def test_re_render_ends_summary_with_the_profile_once(tmp_path):
  res = {"wall_s": 10.0, "phases": {"load": {"seconds": 4.0, "fraction": 0.4}, "compile": {"seconds": 6.0,
                                                                                          "fraction": 0.6}},
         "compile_in": {"load": 6.0},
         "compilations": {"programs": 3, "persistent_cache_hits": 1, "compiled": 2, "traces": 4, "top": []}}
  assert runner.render(str(tmp_path), _Setting()) == "# Summary\n\nrows\n"  # no profile.json: as the setting wrote it
  profile.write(str(tmp_path), res)
  for _ in range(2):  # re-rendering never stacks two profile sections
    text = runner.render(str(tmp_path), _Setting())
  md = (tmp_path / "summary.md").read_text()
  assert md == text and md.count(profile.SECTION_TITLE) == 1 and md.startswith("# Summary\n\nrows\n\n")
  assert "3 XLA programs (1 loaded from the persistent compilation cache, 2 compiled)" in md
  assert "| compile | 6.0" in md.replace("  ", " ").replace("  ", " ")
