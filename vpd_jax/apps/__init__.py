"""Applications built on trained runs and SD weights: predictions for image files (predict.py), the demo (demo.py),
the feature-probe report (probe.py), zero-shot maps (zeroshot.py) and class embeddings (class_embeddings.py)."""
