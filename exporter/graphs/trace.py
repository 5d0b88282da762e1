"""Tracing the three graphs' PyTorch modules to ONNX, and writing a graph to disk: IO shapes pinned to
its spec, weights beside it past the protobuf limit, checked by onnx.checker."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import torch

from exporter.graphs.inputs import sample_pixels, sample_prompt
from runtime.console import quiet_logger
from runtime.errors import ExportError
from runtime.manifest import GraphSpec

PROTOBUF_LIMIT = 2 * 1024**3  # an ONNX file over 2 GB cannot be one protobuf: weights go beside it
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 1024**2  # the default; a margin for the graph itself


def trace_args(info) -> dict[str, tuple]:
    """Example inputs for tracing: every dynamic axis > 1 and distinct, past non-empty."""
    b, n, t, p = 2, 2, 5, 3
    pixels = sample_pixels(info, b, n)
    hidden = torch.randn(b, n, info.vision_seq_len, info.vision_dim)
    prompt = sample_prompt(info, b, n, t)
    mask = torch.cat([torch.ones(b, p, dtype=torch.long), prompt.attention_mask], dim=1)
    cross = [torch.randn(b, info.num_heads, n * info.image_seq_len, info.head_dim)
             for _ in range(2 * info.num_cross_layers)]
    past = [torch.randn(b, info.num_heads, p, info.head_dim) for _ in range(2 * info.num_layers)]
    positions = torch.tensor([4, 1, 3, 0])  # logits at 4 of the 5 positions, in no particular order
    decoder = (prompt.input_ids, mask, prompt.position_ids + p, prompt.image_attention_mask, positions, *cross, *past)
    return {"vision": (pixels.flatten(0, 1),), "perceiver": (hidden,), "decoder": decoder}


def export_graph(module, args: tuple, graph: GraphSpec, tmp: Path, opset: int, external_data_threshold: int) -> GraphSpec:
    """Trace `module` on `args` (from trace_args) into `tmp`/GRAPH.file: IO named by the spec, its
    dynamic axes declared, then saved by write_graph."""
    import onnx

    scratch = tmp / f".trace-{graph.name}"
    scratch.mkdir()
    traced = scratch / graph.file
    try:
        with warnings.catch_warnings(), quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python values
            torch.onnx.export(
                module, args, str(traced),
                input_names=[s.name for s in graph.inputs],
                output_names=[s.name for s in graph.outputs],
                dynamic_axes={s.name: s.dynamic_axes() for s in (*graph.inputs, *graph.outputs)},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"tracing the {graph.name} graph failed: {type(exc).__name__}: {exc}") from exc

    proto = onnx.load(str(traced))  # gathers the weights the exporter may have scattered into many files
    shutil.rmtree(scratch)
    return write_graph(proto, tmp, graph, external_data_threshold)


def write_graph(proto, folder: Path, graph: GraphSpec, external_data_threshold: int, check: bool = True) -> GraphSpec:
    """Save a graph with its IO dims pinned to the spec, its weights beside it (FILE.data) past
    `external_data_threshold` bytes of weights.
    `check`: run onnx.checker (False for graphs with ops only ONNX Runtime registers, such as
    SimplifiedLayerNormalization in the ONNX domain: loading them in ONNX Runtime is their check)."""
    import onnx

    target = folder / graph.file
    pin_io_shapes(proto, graph)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    data = f"{graph.file}.data"
    # onnx appends external data to a file already there: a graph written again (the int8wo ORT
    # decoder's next KV-cache margin) would carry every earlier try's weights
    (folder / data).unlink(missing_ok=True)
    if weight_bytes > external_data_threshold:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        graph = dataclasses.replace(graph, external_data=data)
    else:
        onnx.save_model(proto, str(target))
        graph = dataclasses.replace(graph, external_data=None)
    if check:
        try:
            onnx.checker.check_model(str(target))
        except Exception as exc:
            raise ExportError(f"{target.name}: the graph fails onnx.checker: {exc}") from exc
    return graph


def pin_io_shapes(proto, graph: GraphSpec) -> None:
    """Write the spec's shapes onto the graph's IO: the tracer leaves some fixed sizes symbolic
    (e.g. 'Addimage_hidden_states_dim_1'), which TensorRT profiles and Triton configs would read."""
    specs = {s.name: s for s in (*graph.inputs, *graph.outputs)}
    for value in (*proto.graph.input, *proto.graph.output):
        spec = specs[value.name]
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ExportError(f"{graph.file}: {value.name} has rank {len(dims)}, its spec says {len(spec.shape)}")
        for dim, size in zip(dims, spec.shape):
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size


def remove_graph(folder: Path, file: str) -> None:
    """Remove a graph the export wrote and then left out (it missed its bound), with its external
    data (`FILE.data`, the name write_graph gives it), where they exist."""
    for leftover in (file, f"{file}.data"):
        (Path(folder) / leftover).unlink(missing_ok=True)
