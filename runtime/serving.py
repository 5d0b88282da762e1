"""The `idefics` Triton model (Python backend, decoupled): runtime's own generation loop, with a
runner that calls the vision / perceiver / decoder models through BLS.

Request: "prompt" (text with one `<image>` placeholder per image) and "images" (encoded image
bytes, in placeholder order; never URLs or paths), or transformers-style arrays for one prompt
("input_ids" [1,T], optional "attention_mask", "pixel_values" [1,I,3,H,W], "image_attention_mask");
optional "parameters" (JSON: generation settings as Session.generate takes them, plus
"stream": true to get a response per token).
Response: "text" (the new text; a piece per token when streaming, then the whole text) and
"tokens" (the new token ids). Limits are checked before any model runs; a request that breaks
one gets an error response and the other requests of the batch are unharmed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.errors import ToolkitError
from runtime.loop import Graphs, Timings, generate_tokens
from runtime.manifest import GRAPH_NAMES, GraphSpec, Manifest
from runtime.prompts import PromptEncoder, build_prompt
from runtime.runners.base import BoundCall, CopyingBoundCall, Runner
from runtime.sampling import SamplingConfig
from runtime.session import TextStream, check_length, check_request


class BlsRunner(Runner):
    """A graph served by another Triton model, called with Business Logic Scripting."""

    backend = "triton-bls"

    def __init__(self, spec: GraphSpec, pb):
        super().__init__(spec)
        self.pb = pb

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.spec.outputs]
        request = self.pb.InferenceRequest(
            model_name=self.spec.name, requested_output_names=names,
            inputs=[self.pb.Tensor(name, np.ascontiguousarray(array)) for name, array in feed.items()],
        )
        response = request.exec()
        if response.has_error():
            raise ToolkitError(f"model {self.spec.name!r}: {response.error().message()}")
        return {name: self.pb.get_output_tensor_by_name(response, name).as_numpy() for name in names}

    def bind_impl(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> BoundCall:
        return CopyingBoundCall(self, inputs, outputs)


class Limits:
    def __init__(self, manifest: Manifest, parameters: dict[str, str]):
        self.max_images = manifest.limits.max_images
        self.max_image_bytes = int(parameters.get("max_image_bytes", 20 * 2**20))
        self.max_image_pixels = int(parameters.get("max_image_pixels", 4096 * 4096))
        self.max_new_tokens = int(parameters.get("max_new_tokens", 256))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.pb = importlib.import_module("triton_python_backend_utils")
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args.get("export_dir") or Path(__file__).resolve().parent.parent / "export")
        self.manifest = Manifest.load(folder)
        graphs = self.manifest.graphs_for(parameters.get("precision") or None)
        runners = {name: BlsRunner(graphs[name], self.pb) for name in GRAPH_NAMES}
        for runner in runners.values():
            runner.activate()
        self.graphs = Graphs(self.manifest, runners)
        self.encoder = PromptEncoder(folder)
        self.limits = Limits(self.manifest, parameters)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except (ValueError, TypeError, ToolkitError) as exc:  # this request only
                sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(str(exc))),
                            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _generate(self, request, sender) -> None:
        pb = self.pb
        settings = _parameters(pb.get_input_tensor_by_name(request, "parameters"))
        stream = bool(settings.pop("stream", False))
        cfg = SamplingConfig.from_kwargs(**settings)
        if cfg.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(f"max_new_tokens {cfg.max_new_tokens} exceeds this server's limit "
                             f"{self.limits.max_new_tokens}")
        req = self._arrays(request) if pb.get_input_tensor_by_name(request, "input_ids") is not None \
            else self._prompt(request)
        check_length(self.manifest, req.input_ids.shape[1], cfg.max_new_tokens)
        text, tokens = TextStream(self.encoder), []
        for step in generate_tokens(self.graphs, req, cfg, Timings()):
            tokens.append(int(step.tokens[0]))
            piece = text.add(tokens[-1], step.last)
            if stream and piece:
                sender.send(self._response(piece, tokens[-1:]))
        sender.send(self._response(self.encoder.decode(tokens), tokens),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _prompt(self, request):
        pb = self.pb
        prompt = _strings(pb.get_input_tensor_by_name(request, "prompt"))
        if len(prompt) != 1:
            raise ValueError(f"prompt: expected one string, got {len(prompt)}")
        images_tensor = pb.get_input_tensor_by_name(request, "images")
        images = [bytes(b) for b in images_tensor.as_numpy().reshape(-1)] if images_tensor is not None else []
        items = build_prompt(prompt[0], images, max_images=self.limits.max_images,
                             max_image_bytes=self.limits.max_image_bytes,
                             max_image_pixels=self.limits.max_image_pixels)
        enc = self.encoder.encode([items])
        return check_request(self.manifest, enc.input_ids, enc.attention_mask, enc.pixel_values if images else None,
                             enc.image_attention_mask if images else None)

    def _arrays(self, request):
        """transformers-style input_ids [1,T] (+ attention_mask, pixel_values, image_attention_mask)."""
        def array(name):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        ids = array("input_ids")
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"input_ids: expected one prompt [1, seq], got shape {tuple(ids.shape)}; "
                             "send several prompts as several requests")
        return check_request(self.manifest, ids, array("attention_mask"), array("pixel_values"),
                             array("image_attention_mask"))

    def _response(self, text: str, tokens: list[int]):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text", np.array([text.encode()], dtype=np.object_)),
            pb.Tensor("tokens", np.asarray(tokens, dtype=np.int64)),
        ])

    def finalize(self) -> None:
        pass


def _strings(tensor) -> list[str]:
    if tensor is None:
        raise ValueError("prompt: missing (a string with one <image> placeholder per image)")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


def _parameters(tensor) -> dict[str, Any]:
    if tensor is None:
        return {}
    raw = _strings(tensor)
    try:
        value = json.loads(raw[0]) if raw else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"parameters: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError("parameters: expected a JSON object of generation settings")
    return value
