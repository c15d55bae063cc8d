"""Probabilities -> decisions: temperature, certified thresholds and their bounds (cells and
slides as the unit), conformal sets, slide guard, the running audit's bounds."""
