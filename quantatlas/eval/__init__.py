"""Evaluation: reference-logit cache, KLD/PPL statistics (llama.cpp-compatible), bits and bytes."""
