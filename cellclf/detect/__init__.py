"""Cell candidates: RGB tiles -> one centre per cell; matching against truth points."""
