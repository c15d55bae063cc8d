"""Whole-slide images in: open, tissue, tiles, read (fast JPEG path, device decode), crops."""
