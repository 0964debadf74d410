"""Where a run's time goes: seconds per phase, compile time and the number of compilations.

The runner activates one ``Profile`` per run; the settings mark their phases with the module-level
context manager, a no-op when no profile is active:

  from recovery_jax import profile
  with profile.phase("preflight"):
    ...

Phases nest; each reports its *exclusive* time (a nested phase's time is taken out of its parent),
so the phases add up to the run's wall time. ``PHASES`` are the names the report orders by:

  load        validation, workdir, model / SAE / data loading, feature selection (the runner's default
              for ``Setting.prepare``)
  compile     tracing, lowering and XLA compilation (or a persistent-cache load) of every program,
              measured with ``jax.monitoring`` time-span events (``/jax/core/compile/...``) and taken
              out of the phase that was running when it happened
  preflight   base / defended scoring before recovery
  recovery    the work units (the runner's default for ``Setting.compute_unit``)
  generation  greedy generation (preflight or evaluation with the delta)
  evaluation  rows of finished units, replays, detectors, the setting's own outputs (``finish``)
  report      summary, tables, plots (``Setting.render``)

Compilations are counted from the backend-compile events (one per XLA program compiled or loaded
from the persistent compilation cache) and the cache-hit events; ``top`` names the programs that
took longest.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import threading
import time
from typing import Iterator

from recovery_jax import outputs

PHASES = ("load", "compile", "preflight", "recovery", "generation", "evaluation", "report")
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
COMPILE_EVENTS = (TRACE_EVENT, LOWER_EVENT, BACKEND_EVENT)
SECTION_TITLE = "## Where the time went"
FILE = "profile.json"

_ACTIVE: list["Profile"] = []  # the innermost active profile receives the compile events
_LOCK = threading.Lock()
_REGISTERED = False


class Profile:
  """Exclusive seconds per phase of one run, plus compile time and counts (see the module docstring)."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.compile_in: dict[str, float] = collections.defaultdict(float)  # compile seconds by enclosing phase
    self.programs = 0  # backend compiles (XLA compilations or persistent-cache loads)
    self.cache_hits = 0
    self.traces = 0
    self.by_function: dict[str, float] = collections.defaultdict(float)
    self._stack: list[list] = []  # [name, start, seconds of children]
    self._spans: list[tuple[float, float]] = []  # recent disjoint compile spans (nested events merged)
    self._t0 = time.time()

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Times the block as phase ``name`` (exclusive of nested phases and compiles)."""
    entry = [name, time.time(), 0.0]
    self._stack.append(entry)
    try:
      yield
    finally:
      elapsed = time.time() - entry[1]
      with _LOCK:
        self._stack.remove(entry)
        self.seconds[name] += max(elapsed - entry[2], 0.0)
        if self._stack:
          self._stack[-1][2] += elapsed

  def current(self) -> str | None:
    return self._stack[-1][0] if self._stack else None

  def _on_span(self, event: str, start: float, end: float, fun_name: str = "") -> None:
    """A compile-event time span: the part not already counted (events nest: a jit traced inside
    another's trace reports first, the enclosing one after) goes to ``compile``."""
    with _LOCK:
      inside = [(s, e) for s, e in self._spans if s >= start and e <= end]
      if any(s <= start and e >= end for s, e in self._spans):
        new = 0.0  # within a span already counted
      else:
        new = (end - start) - sum(e - s for s, e in inside)
        self._spans = [sp for sp in self._spans if sp not in inside] + [(start, end)]
        self._spans = self._spans[-256:]
      if event == BACKEND_EVENT:
        self.programs += 1
        self.by_function[fun_name or "?"] += end - start
      elif event == TRACE_EVENT:
        self.traces += 1
      if new > 0:
        self.seconds["compile"] += new
        if self._stack:
          self._stack[-1][2] += new
          self.compile_in[self._stack[-1][0]] += new

  def result(self, wall_s: float | None = None) -> dict:
    """``{"wall_s", "phases": {name: {"seconds", "fraction"}} (PHASES order, then others, then
    "other": wall time outside every phase), "compile_in", "compilations": {...}}``."""
    wall = float(time.time() - self._t0 if wall_s is None else wall_s)
    names = [p for p in PHASES if p in self.seconds] + sorted(set(self.seconds) - set(PHASES))
    phases = {n: float(self.seconds[n]) for n in names}
    phases["other"] = max(wall - sum(phases.values()), 0.0)
    top = sorted(self.by_function.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_s": wall,
            "phases": {n: {"seconds": round(s, 3), "fraction": round(s / wall, 4) if wall > 0 else 0.0}
                       for n, s in phases.items()},
            "compile_in": {n: round(s, 3) for n, s in self.compile_in.items()},
            "compilations": {"programs": self.programs, "persistent_cache_hits": self.cache_hits,
                             "compiled": self.programs - self.cache_hits, "traces": self.traces,
                             "top": [{"function": f, "seconds": round(s, 3)} for f, s in top]}}


def _on_span(event: str, start: float, end: float, **kw) -> None:
  if event in COMPILE_EVENTS and _ACTIVE:
    _ACTIVE[-1]._on_span(event, start, end, str(kw.get("fun_name", "")))  # pylint: disable=protected-access


def _on_event(event: str, **kw) -> None:
  del kw
  if event == CACHE_HIT_EVENT and _ACTIVE:
    with _LOCK:
      _ACTIVE[-1].cache_hits += 1


def _register() -> None:
  """The ``jax.monitoring`` listeners, registered once per process (they forward to the active profile)."""
  global _REGISTERED
  if _REGISTERED:
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.monitoring.register_event_time_span_listener(_on_span)
  jax.monitoring.register_event_listener(_on_event)
  _REGISTERED = True


@contextlib.contextmanager
def active(prof: Profile) -> Iterator[Profile]:
  """Makes ``prof`` receive ``phase`` blocks and compile events for the block's duration."""
  _register()
  _ACTIVE.append(prof)
  try:
    yield prof
  finally:
    _ACTIVE.remove(prof)


def phase(name: str):
  """``with profile.phase(name):`` times the block in the active run's profile (no-op without one)."""
  return _ACTIVE[-1].phase(name) if _ACTIVE else contextlib.nullcontext()


def timed(name: str | None, inside: dict[str, str | None] | None = None):
  """Decorator: each call of the function is a phase, ``inside.get(enclosing phase, name)`` (None: no
  phase of its own, the time stays with the enclosing one). E.g. a generation helper called both
  while preparing and while computing units: ``timed("generation", inside={"load": "preflight"})``."""
  def wrap(fn):
    @functools.wraps(fn)
    def timed_fn(*args, **kw):
      use = (inside or {}).get(current_phase(), name)
      if use is None:
        return fn(*args, **kw)
      with phase(use):
        return fn(*args, **kw)
    return timed_fn
  return wrap


def current_phase() -> str | None:
  """The innermost phase of the active profile (None: none)."""
  return _ACTIVE[-1].current() if _ACTIVE else None


def table(res: dict) -> str:
  """The profile as a markdown section: a phase table and one line on compilations."""
  rows = [[n, f"{p['seconds']:.1f}", f"{100 * p['fraction']:.1f}%"] for n, p in res["phases"].items()]
  c = res["compilations"]
  comp = (f"{c['programs']} XLA programs ({c['persistent_cache_hits']} loaded from the persistent compilation cache, "
          f"{c['compiled']} compiled), {c['traces']} traces")
  within = ", ".join(f"{n} {s:.1f} s" for n, s in sorted(res.get("compile_in", {}).items(), key=lambda kv: -kv[1]))
  return (f"{SECTION_TITLE}\n\nWall time {res['wall_s']:.1f} s; compilations: {comp}"
          + (f"; compile time taken out of: {within}" if within else "") + ".\n\n"
          + outputs.format_table(["phase", "seconds", "fraction"], rows) + "\n")


def write(workdir: str, res: dict) -> None:
  """``workdir/profile.json``."""
  outputs.atomic_write(os.path.join(workdir, FILE), json.dumps(res, indent=1))


def read(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
