"""A bundle measured on data with truth: metrics.json, figures, report."""
