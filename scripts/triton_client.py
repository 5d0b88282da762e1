"""Query the `idefics` model of an idefics-triton repository over gRPC, streaming the text.

    python scripts/triton_client.py --url localhost:8001 --image cat.png --prompt "What is this?"

The prompt gets one <image> placeholder per --image (put them yourself to interleave; otherwise
the images go first, IDEFICS chat style: "User:<image>...<end_of_utterance>\\nAssistant:").
Images are sent as their file bytes; the server never fetches anything.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from pathlib import Path

import numpy as np

PLACEHOLDER = "<image>"


def chat_prompt(prompt: str, images: int) -> str:
    if PLACEHOLDER in prompt:
        return prompt
    return "User:" + PLACEHOLDER * images + f"{prompt}<end_of_utterance>\nAssistant:"


def build_inputs(prompt: str, images: list[bytes], settings: dict) -> list[tuple[str, np.ndarray, str]]:
    """(name, array, Triton datatype) for every input of the idefics model."""
    if prompt.count(PLACEHOLDER) != len(images):
        raise ValueError(f"prompt has {prompt.count(PLACEHOLDER)} {PLACEHOLDER} placeholders for {len(images)} images")
    inputs = [("prompt", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
              ("settings", np.array([json.dumps(settings).encode()], dtype=np.object_), "BYTES")]
    if images:
        inputs.append(("images", np.array(images, dtype=np.object_), "BYTES"))
    return inputs


def is_final(result) -> bool:
    parameter = result.get_response().parameters.get("triton_final_response")
    return bool(parameter is not None and parameter.bool_param)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--image", type=Path, action="append", default=[])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()
    import tritonclient.grpc as grpcclient

    images = [path.read_bytes() for path in args.image]
    settings = {"max_new_tokens": args.max_new_tokens, "stream": not args.no_stream}
    inputs = []
    for name, array, dtype in build_inputs(chat_prompt(args.prompt, len(images)), images, settings):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("idefics", inputs, enable_empty_final_response=True)
    while True:
        result, error = results.get()
        if error is not None:
            print(f"\nerror: {error}", file=sys.stderr)
            return 1
        final = is_final(result)
        text = result.as_numpy("text")
        # streaming: print the pieces (the final response repeats the whole text); otherwise the final text
        if text is not None and final == args.no_stream:
            print(text[0].decode(), end="", flush=True)
        if final:
            break
    client.stop_stream()
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
