"""Labelled data in: QuPath GeoJSON, CSV points, crop folders, manifests."""
