"""The toolkit's exceptions. A caller's mistake raises one of these with a message naming the file,
tensor or setting at fault; the CLIs print the message and exit non-zero without a traceback.

Catch `ToolkitError` for all of them. A request that breaks an export's limits or a setting's type
raises Python's own `ValueError` / `TypeError` instead, naming the argument and the limit."""


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
    """An exported graph disagrees with the PyTorch module past the stated tolerance.

    The export writes nothing. `report` holds the accuracy rows measured, the failing ones
    included (`{graph: {case: {output: row}}}`), where the failed check produced them; else `{}`.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class CalibrationError(ToolkitError):
    """Calibration data could not be read (empty folder, unreadable image, bad prompt file)."""
