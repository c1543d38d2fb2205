"""axiscap: OpenAI-compatible serving that keeps a model in its Assistant persona."""

__version__ = "0.1.0"
