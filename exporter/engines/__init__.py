"""TensorRT engines built from the ONNX graphs through Polygraphy (idefics-build-engines)."""
