"""OOD scores and their evaluation: z-scores against validation (zscore), detection metrics (detection), what
ood_detection.py computes and writes (report), plots, and the scorer for new inputs (scorer)."""
