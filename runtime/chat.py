"""Chat messages (OpenAI's shape) -> IDEFICS's instruct prompt format, in one place.

The format is the one the idefics-9b-instruct model card shows:

    User: What is in this image?<image><end_of_utterance>
    Assistant: This picture depicts Idefix.<end_of_utterance>
    User:<image>And who is that?<end_of_utterance>
    Assistant:

Rules (`messages_to_prompt`):
- a system message's text comes first, on a line of its own ("{system}\\n"), before the turns;
- a user turn is "User:" + its parts + "<end_of_utterance>\\n"; a text part right after "User:"
  gets one space ("User: What ..."), a text part after an image none; consecutive text parts are
  joined with one space; an image part is an `<image>` placeholder;
- an assistant turn is "Assistant: " + its text + "<end_of_utterance>\\n" (text only);
- the prompt ends with "Assistant:" (the model's turn); the last message must be the user's.

The result is text with one `<image>` placeholder per image plus the images' sources in order:
what the `idefics` Triton model takes (prompt + images) and what `runtime.prompts.build_prompt`
turns into an interleaved prompt for `Session`. `Session.generate(messages=...)`,
`idefics-generate` and the OpenAI-compatible frontend (runtime.openai_server) all use it.

Images (`load_image_url`): `data:` URLs (base64) always; local files (a path or file:// URL) only
under a directory the operator allows; http(s) URLs are refused (a server never fetches what a
request names).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlparse

from runtime.prompts import IMAGE_PLACEHOLDER

END_OF_UTTERANCE = "<end_of_utterance>"
USER, ASSISTANT = "User:", "Assistant:"
ROLES = ("system", "developer", "user", "assistant")


class ChatError(ValueError):
    """A message list (or an image in it) that cannot become a prompt; `param` names the field
    ("messages[2].content[1].image_url"), `status` the HTTP status an endpoint answers with."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class ChatPrompt:
    text: str  # with one <image> placeholder per image
    images: list[str] = field(default_factory=list)  # each image's URL as the message gave it (data:, file, path)
    params: list[str] = field(default_factory=list)  # each image's field name, for error messages


def _text_of(part: Mapping[str, Any], where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise ChatError(f"{where}.text: expected a string", f"{where}.text")
    if IMAGE_PLACEHOLDER in text:
        raise ChatError(f"{where}.text: contains {IMAGE_PLACEHOLDER}, which marks an image in IDEFICS's prompt; "
                        "send images as image_url parts", f"{where}.text")
    return text


def _parts(content: Any, where: str) -> list[tuple[str, str]]:
    """A message's content -> [("text", str) | ("image", url)]."""
    if isinstance(content, str):
        return [("text", _check_text(content, where))]
    if not isinstance(content, list) or not content:
        raise ChatError(f"{where}: expected a string or a non-empty list of content parts", where)
    parts = []
    for k, part in enumerate(content):
        here = f"{where}[{k}]"
        if not isinstance(part, Mapping):
            raise ChatError(f"{here}: expected an object with a type", here)
        kind = part.get("type")
        if kind == "text":
            extra = sorted(set(part) - {"type", "text"})
            if extra:
                raise ChatError(f"{here}: unsupported field {extra[0]!r}", f"{here}.{extra[0]}")
            parts.append(("text", _text_of(part, here)))
        elif kind == "image_url":
            extra = sorted(set(part) - {"type", "image_url"})
            if extra:
                raise ChatError(f"{here}: unsupported field {extra[0]!r}", f"{here}.{extra[0]}")
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            if isinstance(image, Mapping):
                extra = sorted(set(image) - {"url", "detail"})
                if extra:
                    raise ChatError(f"{here}.image_url: unsupported field {extra[0]!r}", f"{here}.image_url.{extra[0]}")
            if not isinstance(url, str) or not url:
                raise ChatError(f"{here}.image_url.url: expected a URL string", f"{here}.image_url.url")
            parts.append(("image", url))
        else:
            raise ChatError(f"{here}.type: unsupported content part type {kind!r} (supported: text, image_url)",
                            f"{here}.type")
    return parts


def _check_text(text: str, where: str) -> str:
    if IMAGE_PLACEHOLDER in text:
        raise ChatError(f"{where}: contains {IMAGE_PLACEHOLDER}, which marks an image in IDEFICS's prompt; "
                        "send images as image_url parts", where)
    return text


def messages_to_prompt(messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
    """OpenAI-style chat messages -> IDEFICS's instruct prompt (see the module's docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatError("messages: expected a non-empty list of messages", "messages")
    text, images, params = "", [], []
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, Mapping):
            raise ChatError(f"{where}: expected an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}.role: unsupported role {role!r} (supported: system, user, assistant)",
                            f"{where}.role")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise ChatError(f"{where}: unsupported field {extra[0]!r}", f"{where}.{extra[0]}")
        parts = _parts(message.get("content"), f"{where}.content")
        if role in ("system", "developer", "assistant") and any(kind == "image" for kind, _ in parts):
            raise ChatError(f"{where}: a {role} message can hold text only", f"{where}.content")
        if role in ("system", "developer"):
            text += " ".join(value for _, value in parts) + "\n"
        elif role == "assistant":
            text += f"{ASSISTANT} " + " ".join(value for _, value in parts) + f"{END_OF_UTTERANCE}\n"
        else:
            text += USER
            previous = "start"
            for k, (kind, value) in enumerate(parts):
                if kind == "image":
                    text += IMAGE_PLACEHOLDER
                    images.append(value)
                    params.append(f"{where}.content[{k}].image_url" if isinstance(message.get("content"), list)
                                  else f"{where}.content")
                else:
                    text += (" " if previous in ("start", "text") else "") + value
                previous = kind
            text += f"{END_OF_UTTERANCE}\n"
    if messages[-1].get("role") != "user":
        raise ChatError("messages: the last message must be the user's (the model answers it)",
                        f"messages[{len(messages) - 1}].role")
    return ChatPrompt(text + ASSISTANT, images, params)


def is_chat_prompt(prompt: str) -> bool:
    """Whether a text prompt is already in the chat format, or typed by hand in it ("User:",
    "Assistant:" or <end_of_utterance> in it): then it is used as it is."""
    return any(mark in prompt for mark in (USER, ASSISTANT, END_OF_UTTERANCE))


def question_to_prompt(question: str, images: int = 0) -> str:
    """A plain question (and IMAGES images before it, unless it places them with <image>) -> the
    chat prompt of one user turn; a prompt already in the chat format is returned unchanged."""
    if is_chat_prompt(question):
        return question
    if IMAGE_PLACEHOLDER in question:
        return f"{USER}" + ("" if question.startswith(IMAGE_PLACEHOLDER) else " ") + \
            f"{question}{END_OF_UTTERANCE}\n{ASSISTANT}"
    return f"{USER}{IMAGE_PLACEHOLDER * images}" + ("" if images else " ") + f"{question}{END_OF_UTTERANCE}\n{ASSISTANT}"


# ------------------------------------------------------------ images
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def load_image_url(url: str, param: str = "image_url", allowed_dir: str | os.PathLike | None = None,
                   max_bytes: int | None = None) -> bytes:
    """An image_url's encoded bytes: a data: URL (base64), or a local file (a path or file:// URL)
    under ALLOWED_DIR (None: no local files). http(s) and other URLs are refused. Raises ChatError
    (status 413 when the image is over MAX_BYTES)."""
    if url.startswith("data:"):
        found = DATA_URL.match(url)
        if not found or not found.group("b64"):
            raise ChatError(f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param)
        if found.group("mime") and not found.group("mime").startswith("image/"):
            raise ChatError(f"{param}: a data: URL of {found.group('mime')}, not an image", param)
        encoded = found.group("data")
        if max_bytes is not None and len(encoded) * 3 // 4 > max_bytes + 3:
            raise ChatError(f"{param}: about {len(encoded) * 3 // 4} bytes; the limit is {max_bytes}", param, 413)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ChatError(f"{param}: the data: URL is not valid base64 ({exc})", param) from exc
    else:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise ChatError(f"{param}: remote image URLs are not fetched ({parsed.scheme}://{parsed.netloc}/...); "
                            "send the image as a data: URL (data:image/jpeg;base64,...)", param)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
        elif parsed.scheme and len(parsed.scheme) > 1:
            raise ChatError(f"{param}: unsupported URL scheme {parsed.scheme!r}; send a data: URL", param)
        else:
            path = Path(url)
        if allowed_dir is None:
            raise ChatError(f"{param}: local image files are not allowed by this server (it was started without "
                            "--allowed-image-dir); send a data: URL", param)
        root = Path(allowed_dir).resolve()
        resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if resolved != root and root not in resolved.parents:
            raise ChatError(f"{param}: {url} is outside the directory this server allows images from", param)
        if not resolved.is_file():
            raise ChatError(f"{param}: {url}: no such file", param)
        size = resolved.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise ChatError(f"{param}: {size} bytes; the limit is {max_bytes}", param, 413)
        data = resolved.read_bytes()
    if max_bytes is not None and len(data) > max_bytes:
        raise ChatError(f"{param}: {len(data)} bytes; the limit is {max_bytes}", param, 413)
    if not data:
        raise ChatError(f"{param}: empty image", param)
    return data


def chat_generation_settings(tokenizer, manifest) -> dict[str, Any]:
    """What a chat turn generates with, as the instruct model card does: stop at the model's eos or
    at <end_of_utterance> (when the tokenizer has it), and never emit image tokens."""
    eos = manifest.model.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    end = tokenizer.token_to_id(END_OF_UTTERANCE) if tokenizer is not None else None
    if end is not None and end not in eos:
        eos.append(int(end))
    settings: dict[str, Any] = {}
    if eos:
        settings["eos_token_id"] = tuple(int(e) for e in eos)
    if manifest.model.image_token_ids:
        settings["bad_words_ids"] = tuple((int(i),) for i in manifest.model.image_token_ids)
    return settings
