"""An IDEFICS checkpoint to ONNX graphs, their reduced-precision variants, TensorRT engines and a
Triton repository, with the manifest every later step reads (`idefics-export`: exporter.cli).

Subpackages, lower layers first (tests/exporter/test_layering.py keeps the arrows pointing down):
graphs (IO specs, tracing, validation) < precision (FP16/INT8/int8wo variants) < ort (the
--ort-optimized graphs) < stream (the layer-streamed export of the published sizes) < check
(idefics-check); engines and triton stand on runtime/ alone; the
pipeline (export.py) and its CLI (cli.py) sit on top."""
