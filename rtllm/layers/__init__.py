"""rtllm.layers."""
