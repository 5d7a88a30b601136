"""kiln: LLM inference for Llama-family GGUF models on CUDA, WebGPU and NumPy."""
