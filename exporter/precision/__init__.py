"""FP16, INT8 and INT8 weight-only variants of the graphs as ONNX-to-ONNX transforms, and the search for the nodes kept in FP32 until each variant meets its bounds."""
