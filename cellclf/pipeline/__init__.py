"""One slide through the flow (run_slide, host and device stages), batches of slides, scale-out."""
