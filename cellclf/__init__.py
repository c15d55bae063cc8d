"""cellclf: whole-slide cell classifier (eosinophils, neutrophils, mast cells) with a review gate."""

__version__ = "0.1.0"
