"""The three graphs (vision, perceiver, decoder-with-past): IO specs, sample inputs, tracing to ONNX, and validation against the PyTorch modules within the accuracy bounds."""
