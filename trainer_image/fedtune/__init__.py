"""fedtune: federated fine-tuning of ChatGLM-family models."""

__version__ = "0.1.0"
