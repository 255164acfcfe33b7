"""rtllm.kernels."""
