"""The toolkit's exceptions. A caller's mistake raises one of these with a message naming the file,
tensor or setting at fault; the CLIs print the message and exit non-zero without a traceback."""


class ToolkitError(Exception):
    """Base of every error this toolkit raises on purpose."""


class ManifestError(ToolkitError):
    """manifest.json is missing, unreadable, of another format version, or disagrees with the files."""


class ModelLoadError(ToolkitError):
    """A checkpoint, hub id or preset could not be turned into an IDEFICS model."""


class ReferenceMismatchError(ModelLoadError):
    """The PyTorch reference rebuilt for an export loaded, but its config is not the exported one."""


class ExportError(ToolkitError):
    """Export could not produce the graphs (output folder, limits, tracing)."""


class ValidationError(ExportError):
    """An exported graph disagrees with the PyTorch module past the stated tolerance."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class CalibrationError(ToolkitError):
    """Calibration data could not be read (empty folder, unreadable image, bad prompt file)."""
