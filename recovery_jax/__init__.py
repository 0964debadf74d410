"""recovery_jax: post-intervention recovery of SAE-suppressed behaviour, in JAX.

The documented Python API (``recovery_jax.api``, docs/api.md) is exported here lazily, so ``import
recovery_jax`` stays cheap (no JAX import until a name is used)::

  import recovery_jax as rj
  model = rj.load_model("path/to/hf_folder")
  sae = rj.load_sae("path/to/saelens_folder", model, site="blocks.4.hook_resid_pre")
  verdicts = rj.recover(model, rj.defence(sae, [1, 2, 3], value=-5.0), prompts, rj.LogitDiff(io, s))

The functional primitives stay in their modules: ``recovery_jax.models`` (``forward``, ``load_model``),
``recovery_jax.sae.core`` (encode / decode), ``recovery_jax.intervene`` (the clamp transform),
``recovery_jax.recovery.projections``, ``recovery_jax.recovery.optimizer`` and ``recovery_jax.recovery.engine``.
"""

__version__ = "0.1.0"

_API = ("Model", "SAE", "load_model", "load_sae", "Defence", "defence", "LogitDiff", "AnswerChoice", "Continuation",
        "Verdict", "recover", "top_features", "encode_prompts", "table")
_ELSEWHERE = {"RecoveryConfig": "recovery_jax.recovery.optimizer", "ClampSpec": "recovery_jax.intervene",
              "Objective": "recovery_jax.recovery.objectives"}
__all__ = _API + tuple(_ELSEWHERE)


def __getattr__(name):
  if name in _API or name in _ELSEWHERE:
    import importlib  # pylint: disable=import-outside-toplevel
    value = getattr(importlib.import_module(_ELSEWHERE.get(name, "recovery_jax.api")), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'recovery_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(__all__))
