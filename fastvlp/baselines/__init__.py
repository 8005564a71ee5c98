"""Two-stage baselines that the end-to-end model is compared against."""
