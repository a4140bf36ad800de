"""Reconstruction: the engines (engine), per-(image, t) metrics (metrics), encode -> engine -> decode -> metrics
(pipeline), and the reconstruct.py stage (stage)."""
