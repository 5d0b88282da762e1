"""The Triton Inference Server model repository (idefics-triton) and a real Triton server over it (idefics-serve)."""
