"""Capture: a model and its example inputs become a shape-annotated ``torch.fx`` graph (symbolic trace,
``torch.export``, Hugging Face models)."""
