"""What a deployment imports: `Session` (generation over an export) and the manifest it reads.

Needs numpy, onnxruntime, tokenizers and Pillow; never torch or the exporter."""

from runtime.errors import ManifestError, ToolkitError
from runtime.session import GenerateResult, Session

__all__ = ["Session", "GenerateResult", "ToolkitError", "ManifestError"]
