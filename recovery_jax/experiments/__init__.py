"""Experiment runners: one module per experiment family, each with ``run(config, workdir)``."""
