"""rtllm.engine."""
