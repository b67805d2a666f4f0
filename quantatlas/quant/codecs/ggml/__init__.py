"""llama.cpp / ggml block formats, byte for byte as ggml stores them.

Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (blocks of 32), Q2_K Q3_K Q4_K Q5_K Q6_K (super-blocks of 256),
IQ4_NL (32) and IQ4_XS (256); the reference quantization search of each (ggml-quants.c), with
and without an importance matrix. Shared parts: cfloat.py (C float semantics), search.py (the
scale searches), block_codec.py (codec plumbing).
"""
