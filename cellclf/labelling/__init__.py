"""Labelling projects: a lab's first model from zero labels (`cellclf label`)."""
