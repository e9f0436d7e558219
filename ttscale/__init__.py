"""ttscale: test-time-scaling inference on vLLM, behind an OpenAI-compatible API.

The library imports neither the server, FastAPI nor vLLM; engines load vLLM when they start.
"""

__version__ = "0.1.0"
