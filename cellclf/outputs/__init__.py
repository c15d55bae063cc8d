"""What a run writes: results, report, HPF counts, plots, manifest, atomic writes."""
