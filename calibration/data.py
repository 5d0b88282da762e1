"""Calibration inputs: real photos and instruction prompts, loaded once and fingerprinted.

INT8 calibration is only as good as the data it sees, so the inputs are real photographs (a user's
folder, or scikit-image's bundled samples) and IDEFICS chat prompts. The digest identifies the data
by content (pixels and text, never file timestamps), so cached calibration tensors are reused exactly
when the same data would be fed again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image
from tqdm import tqdm

from calibration.images import BUILTIN
from runtime.errors import CalibrationError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

DEFAULT_PROMPTS = (
    "Describe this image.",
    "What is in the picture?",
    "What colours stand out in this photo?",
    "Write a short caption for this image.",
    "How many objects can you see?",
    "What is happening here?",
    "Describe the background of the picture.",
    "What would you notice first in this photo?",
)

END_OF_UTTERANCE = "<end_of_utterance>"

# Everything Pillow raises for a file it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), corrupt headers (SyntaxError, ValueError), decompression bombs.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# Bump when the digest recipe changes, so digests from an older recipe never match.
_DIGEST_VERSION = b"idefics-toolkit calibration data v1"


# ---------------------------------------------------------------- images
def load_image_folder(folder: Path, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) for each image file directly in `folder`, sorted by name.

    `limit` decodes only the first `limit` files (by name): a large folder need not be read whole
    when calibration uses a few images.
    """
    folder = Path(folder)
    files = _image_files(folder)
    if limit is not None:
        files = files[:limit]
    # disable=None: a bar on a terminal only, never in logs or CI output
    progress = tqdm(files, desc="decoding calibration images", unit="image", disable=None, leave=False)
    return [(path.name, _decode(path)) for path in progress]


def _image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise CalibrationError(f"{folder}: calibration image folder does not exist")
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: not a folder; --calibration-images needs a folder of images")
    files = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if _is_image_file(path):
            files.append(path)
        else:
            log.debug("skipping %s: not an image file", path)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise CalibrationError(f"{folder}: holds no image files ({extensions})")
    return files


def _is_image_file(path: Path) -> bool:
    # Dot files are skipped: macOS writes "._photo.jpg" resource forks next to real photos, and
    # they are not images even though their names say so.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and names itself
            return to_rgb(image)
    except _DECODE_ERRORS as error:
        raise CalibrationError(f"{path}: cannot be decoded as an image ({error})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as IdeficsImageProcessor sees it: transparency painted onto white.

    PIL's convert("RGB") drops alpha and keeps whatever colour hides under transparent pixels
    (often black); the processor (and runtime.prompts.PromptEncoder) paints them white instead, so
    calibrating on convert("RGB") output would calibrate on pixels inference never sees.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _builtin(count: int) -> list[tuple[str, Image.Image]]:
    try:
        from calibration.images import builtin_images
        images = builtin_images(min(count, len(BUILTIN)))
    except ImportError as error:  # scikit-image ships the photos; it is an optional dependency
        raise CalibrationError(
            f"the built-in calibration photos need scikit-image ({error}); "
            "install it or pass --calibration-images FOLDER"
        ) from error
    return list(zip(BUILTIN, images))


# ---------------------------------------------------------------- prompts
def load_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (surrounding whitespace stripped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:  # missing, a folder, unreadable
        raise CalibrationError(f"{path}: cannot read the calibration prompt file ({error.strerror or error})") from error
    try:
        text = raw.decode("utf-8-sig")  # -sig: editors on Windows start UTF-8 files with a BOM
    except UnicodeDecodeError as error:
        raise CalibrationError(f"{path}: not UTF-8 text ({error})") from error
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalibrationError(f"{path}: holds no prompts (expected one prompt per line)")
    return prompts


# ---------------------------------------------------------------- the data set
@dataclass(frozen=True)
class CalibrationData:
    """Calibration images and prompts, identified by `digest`.

    Equality and hashing use the digest only: PIL images are unhashable, and two loads of the same
    pixels are the same data.
    """

    images: tuple[tuple[str, Image.Image], ...] = field(compare=False, repr=False)
    prompts: tuple[str, ...] = field(compare=False)
    digest: str

    @classmethod
    def of(cls, images: Iterable[tuple[str, Image.Image]], prompts: Iterable[str]) -> "CalibrationData":
        images, prompts = tuple(images), tuple(prompts)
        return cls(images, prompts, data_digest(images, prompts))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.images)


def data_digest(images: Sequence[tuple[str, Image.Image]], prompts: Sequence[str]) -> str:
    """sha256 over names, sizes, modes, pixels and prompts, in order; each field length-prefixed so
    that moving bytes from one field into the next changes the digest."""
    h = hashlib.sha256(_DIGEST_VERSION)
    _put(h, str(len(images)).encode())
    for name, image in images:
        _put(h, name.encode("utf-8"))
        _put(h, f"{image.width}x{image.height}".encode())
        _put(h, image.mode.encode())
        _put(h, image.tobytes())
    _put(h, str(len(prompts)).encode())
    for prompt in prompts:
        _put(h, prompt.encode("utf-8"))
    return h.hexdigest()


def _put(h: Any, data: bytes) -> None:  # h: a hashlib hash object
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def calibration_data(
    images_dir: Path | None = None, size: int = 16, prompts_file: Path | None = None
) -> CalibrationData:
    """`size` images (from `images_dir`, else the built-in photos; cycled when fewer exist) and the
    prompts (from `prompts_file`, else DEFAULT_PROMPTS)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CalibrationError(f"--calibration-size must be a positive integer, got {size!r}")
    if images_dir is None:
        available = _builtin(size)
        source = "built-in photos"
    else:
        available = load_image_folder(Path(images_dir), limit=size)
        source = str(images_dir)
    images = [available[i % len(available)] for i in range(size)]
    prompts = load_prompts(Path(prompts_file)) if prompts_file is not None else list(DEFAULT_PROMPTS)
    data = CalibrationData.of(images, prompts)
    log.info(
        "calibration data: %d images (%d distinct) from %s, %d prompts, digest %s",
        size, len(available), source, len(prompts), data.digest[:12],
    )
    return data


def interleaved_prompts(data: CalibrationData, images_per_prompt: int = 1) -> list[list]:
    """IDEFICS chat prompts `["User:", image..., "<prompt><end_of_utterance>\\nAssistant:"]`.

    Images are taken in order, `images_per_prompt` to a prompt, so every image is used; the last
    group wraps round to the first images when the count does not divide. Prompt texts cycle.
    """
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise CalibrationError(f"images per prompt must be a positive integer, got {images_per_prompt!r}")
    if not data.images or not data.prompts:
        raise CalibrationError("calibration data holds no images or no prompts")
    images = [image for _, image in data.images]
    count = -(-len(images) // images_per_prompt)  # ceil: no image left out
    prompts = []
    for row in range(count):
        group = [images[(row * images_per_prompt + k) % len(images)] for k in range(images_per_prompt)]
        text = data.prompts[row % len(data.prompts)]
        prompts.append(["User:", *group, f"{text}{END_OF_UTTERANCE}\nAssistant:"])
    return prompts
