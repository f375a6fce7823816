"""HTTP API: the OpenAI-compatible endpoints, health and metrics."""
