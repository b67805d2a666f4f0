"""Artifacts other tools made, as arms (`artifact:` in a spec; quant/steps/artifact.py):

    config.py               the arm's typed config (no torch)
    stored.py               what an artifact stores, its content hash and provenance (no torch)
    weights.py              matching its tensors to the model, loading them, its bits and bytes
    gguf_reader.py          GGUF (llama.cpp), through the gguf package's dequantizers
    gptq.py, awq.py         HF GPTQ (v1 and v2) and AutoAWQ GEMM checkpoints
    compressed_tensors.py   compressed-tensors folders, through the compressed-tensors package
    packing.py, folder.py   int32 code packing; what the HF-folder formats share
"""
