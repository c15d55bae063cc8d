"""Probabilities → decisions (pure maths): temperature, certified thresholds and their bounds
(cells and slides as the unit), conformal sets, the slide guard, the running audit's bounds."""
