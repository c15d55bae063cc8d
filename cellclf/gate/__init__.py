"""Probabilities -> decisions: temperature, certified thresholds and their bounds, conformal sets,
slide guard, fitting a bundle's gate.
"""
