"""Probabilities → decisions (pure maths): temperature, certified thresholds and their bounds,
conformal sets, the slide guard."""
