"""Evaluation: batch sampling, metrics, scaling-curve fits, reports (installed as ``ttscale.eval``)."""
