"""TPP latent-level recovery (paper-method 3, 7, 10.1): ``app`` is the setting (probes, the TPP table,
recovery on the probe path), ``report`` its summaries and ``tpp.md``."""

from recovery_jax.experiments.tpp.app import SETTING, TPP, check, prepare, render, run
from recovery_jax.experiments.tpp.report import render_tpp, tpp_summary

__all__ = ["SETTING", "TPP", "check", "prepare", "render", "run", "render_tpp", "tpp_summary"]
