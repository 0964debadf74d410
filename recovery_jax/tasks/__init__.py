"""Experiment tasks: token batches, readouts and behaviour predicates."""
