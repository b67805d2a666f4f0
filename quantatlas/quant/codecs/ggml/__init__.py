"""llama.cpp / ggml block formats, byte for byte as ggml stores them."""
