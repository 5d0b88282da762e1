"""The --ort-optimized graphs: ONNX Runtime's fused decoder (GroupQueryAttention) and encoders, their INT8 forms, and what to do when ONNX Runtime refuses one."""
