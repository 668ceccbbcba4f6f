"""hedge: an OpenAI-compatible LLM gateway whose fast lane races hedged upstream calls."""

__version__ = "0.1.0"
