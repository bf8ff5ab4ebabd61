"""alignkit: align language models with feedback, measured against a hidden gold reward."""

__version__ = "0.1.0"
