"""Fitting a bundle's gate on data with truth the model never saw: `cellclf calibrate`
(temperature, certified thresholds, conformal sets, slide guard) and the int8 graph with its own
gate (`cellclf export --int8`)."""
