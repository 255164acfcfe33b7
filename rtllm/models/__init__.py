"""rtllm.models."""
