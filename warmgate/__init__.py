"""warmgate: an in-container warm-up supervisor for vLLM and OpenAI-compatible servers."""

__version__ = "0.1.0"
