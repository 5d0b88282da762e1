"""Load through a real Triton Inference Server: N concurrent gRPC streaming clients, for a bounded time.

    python scripts/triton_load.py                      # random:medium FP32, 8 clients, 30 s per variant
    python scripts/triton_load.py --export out/ --clients 16 --duration 60
    python scripts/triton_load.py --smoke              # the embedded tiny model, seconds (CI)

Every variant runs the same seeded requests (--prompt-tokens tokens, --images photos, --new-tokens
new tokens each, greedy, min_new_tokens = max_new_tokens) in one run on one machine:

  server        the idefics-triton repository with the graphs in the idefics model's process (the
                default), served by `exporter.triton.serve.TritonServer` on 127.0.0.1: --clients gRPC
                streaming clients, each sending its next request when its last one ends, for
                --duration seconds (requests still running then are finished and counted).
  server-bls    the same through the BLS variant (--graphs bls-python: vision, perceiver and decoder
                as separate models that the idefics model calls, the caches sent with every step).
  session       the same clients on an in-process `runtime.Session` (threads calling the engine).
  static        the Session's static batch: --clients requests as one batched call, repeated for
                --duration (the throughput the in-flight batching target is measured against).
  per-token     one client alone, one request at a time, through each of the three paths: the mean
                time per token after the first (the per-token cost of BLS against in-process).

Per variant: throughput (generated tokens / wall seconds), time to first token and inter-token
latency p50/p95 (from the client's side: its send, and the arrival of each streamed response),
requests, errors. The target on the CPU: server throughput with 8 clients >= 0.9x the static
batch's. Writes a table, --json (default docs/triton-DEVICE.json). The server environment is made
once by exporter.triton.serve (pip); the export is made once into the toolkit cache (scripts/serving_load.py's).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import serving_load  # noqa: E402  (the export cache, the workload and the statistics are shared)

VARIANTS = ("server", "server-bls", "session", "static", "per-token")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:medium", help="what to export (default: random:medium)")
    p.add_argument("--export", type=Path, default=None, help="an existing export to serve instead")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds each variant sends requests (default: 30)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompt length of every request (default: 48)")
    p.add_argument("--images", type=int, default=1, help="photos per request (default: 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    p.add_argument("--per-token-requests", type=int, default=3, help="requests of the per-token rows (default: 3)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to run (default: all)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: docs/triton-cpu.json)")
    p.add_argument("--smoke", action="store_true", help="the embedded tiny model, 3 clients, 2 s: a CI-sized run")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.clients, args.duration, args.prompt_tokens, args.new_tokens = "default", 3, 2.0, 16, 6
        args.per_token_requests = 1
    if args.clients < 1 or args.duration <= 0 or args.new_tokens < 1:
        p.error("--clients, --duration and --new-tokens must be positive")
    return args


# ---------------------------------------------------------------- clients
def grpc_request(url: str, inputs: dict, new_tokens: int) -> dict:
    """One streaming request: {"ttft", "gaps", "tokens", "error"} as the client sees them."""
    import tritonclient.grpc as grpcclient

    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "stream": True}
    arrays = {k: v for k, v in inputs.items() if v is not None}
    tensors = []
    for name, array in arrays.items():
        t = grpcclient.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(array)
        tensors.append(t)
    t = grpcclient.InferInput("settings", [1], "BYTES")
    t.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=np.object_))
    tensors.append(t)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    start, stamps, tokens, error = time.perf_counter(), [], [], None
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error, time.perf_counter())))
        client.async_stream_infer("idefics", tensors, enable_empty_final_response=True)
        while True:
            result, err, at = results.get(timeout=300)
            if err is not None:
                error = str(err)
                break
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                tokens = result.as_numpy("tokens").tolist()
                break
            stamps.append(at)
        client.stop_stream()
    finally:
        client.close()
    return {"ttft": stamps[0] - start if stamps else None, "gaps": list(np.diff(stamps)), "tokens": tokens,
            "error": error}


def session_request(session, inputs: dict, new_tokens: int) -> dict:
    """The same request through an in-process Session's engine (serving_load's token-level client)."""
    rec = serving_load.run_job(session, inputs, new_tokens)
    stamps = rec["stamps"]
    return {"ttft": stamps[0] - rec["send"] if stamps else None, "gaps": list(np.diff(stamps)),
            "tokens": rec["tokens"][0], "error": rec["error"]}


def closed_loop(send, items, clients: int, duration: float) -> dict:
    """`clients` threads sending the items round-robin, each its next when its last ends, for `duration`."""
    records, lock, begin = [], threading.Lock(), time.perf_counter()
    deadline = begin + duration

    def client(c):
        k = c
        while time.perf_counter() < deadline:
            item = items[k % len(items)]
            rec = send(item.inputs(), item.new_tokens)
            with lock:
                records.append(rec)
            k += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(records, time.perf_counter() - begin)


def summarize(records: list[dict], seconds: float) -> dict:
    tokens = sum(len(r["tokens"]) for r in records if r["error"] is None)
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    gaps = [g for r in records for g in r["gaps"]]
    pct = serving_load.percentile
    return {"requests": len(records), "errors": sum(r["error"] is not None for r in records),
            "first_error": next((r["error"] for r in records if r["error"]), None), "tokens": tokens,
            "seconds": seconds, "tok_s": tokens / seconds if seconds else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "itl_p50_ms": None if not gaps else pct(gaps, 50) * 1e3, "itl_p95_ms": None if not gaps else pct(gaps, 95) * 1e3}


# ---------------------------------------------------------------- variants
@contextlib.contextmanager
def serve(export_dir: Path, graphs: str, clients: int):
    """A Triton server over a repository of `graphs` in a temporary folder, removed after the run;
    kept (with its server.log, and said on stderr) if the run fails."""
    from exporter.triton.serve import TritonServer
    from exporter.triton.repository import RepositoryConfig, write_repository

    folder = Path(tempfile.mkdtemp(prefix=f"triton-load-{graphs}-"))
    try:
        repo = write_repository(export_dir, folder / "repo", RepositoryConfig(graphs=graphs, kind="KIND_CPU",
                                                                              max_queued=max(64, 2 * clients)))
        with TritonServer(repo, log=folder / "server.log", timeout=300) as server:
            yield server
    except BaseException:
        print(f"triton_load: the {graphs} run failed; its repository and server.log are kept in {folder}",
              file=sys.stderr)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def run(args, export_dir: Path) -> dict:
    from runtime import Session
    from runtime.manifest import Manifest

    manifest = Manifest.load(export_dir)
    workload = serving_load.Workload(manifest, seed=0)
    items = [workload.item(args.prompt_tokens, args.images, args.new_tokens) for _ in range(max(args.clients, 8))]
    result = {"variants": {}, "per_token_ms": {}}
    session = Session(export_dir, max_batch=min(manifest.limits.max_batch, max(args.clients, 1)))
    try:
        serving_load.settle()
        session_request(session, items[0].inputs(), 2)  # warm-up
        if "session" in args.variants:
            serving_load.settle()
            result["variants"]["session"] = closed_loop(lambda i, n: session_request(session, i, n), items,
                                                        args.clients, args.duration)
        if "static" in args.variants:
            serving_load.settle()
            batch = serving_load.batch_inputs(items[:args.clients], manifest.model.pad_token_id or 0)
            records, begin = [], time.perf_counter()
            while time.perf_counter() < begin + args.duration:
                r = session.generate(**{k: v for k, v in batch.items() if v is not None},
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                first = r.timings["first_token"]
                gaps = r.timings["decode"]
                records += [{"ttft": first, "gaps": gaps, "tokens": list(row[r.prompt_length:]), "error": None}
                            for row in r.sequences]
            result["variants"]["static"] = summarize(records, time.perf_counter() - begin)
        if "per-token" in args.variants:
            result["per_token_ms"]["session"] = per_token(lambda i, n: session_request(session, i, n), items, args)
    finally:
        session.close()
    for name, graphs in (("server", "inprocess"), ("server-bls", "bls-python")):
        if name not in args.variants and "per-token" not in args.variants:
            continue
        with serve(export_dir, graphs, args.clients) as server:
            url = server.grpc_url.removeprefix("grpc://")
            grpc_request(url, items[0].inputs(), 2)  # warm-up
            if name in args.variants:
                serving_load.settle()
                result["variants"][name] = closed_loop(lambda i, n: grpc_request(url, i, n), items, args.clients,
                                                       args.duration)
            if "per-token" in args.variants:
                result["per_token_ms"][name] = per_token(lambda i, n: grpc_request(url, i, n), items, args)
    v = result["variants"]
    if "server" in v and "static" in v:
        result["server_over_static_throughput"] = v["server"]["tok_s"] / v["static"]["tok_s"]
    if "session" in v and "static" in v:
        result["session_over_static_throughput"] = v["session"]["tok_s"] / v["static"]["tok_s"]
    p = result["per_token_ms"]
    if "server" in p and "server-bls" in p:
        result["bls_over_inprocess_per_token"] = p["server-bls"] / p["server"]
    return result


def per_token(send, items, args) -> float:
    """Mean inter-token milliseconds of one client alone (first token to last, over the tokens between),
    over --per-token-requests requests."""
    serving_load.settle()
    gaps = []
    for item in items[:args.per_token_requests]:
        rec = send(item.inputs(), item.new_tokens)
        if rec["error"]:
            raise RuntimeError(rec["error"])
        gaps += rec["gaps"]
    return float(np.mean(gaps)) * 1e3


def table(result: dict) -> str:
    rows = ["| variant | requests | errors | tok/s | TTFT p50 / p95 s | inter-token p50 / p95 ms |", "|---|---|---|---|---|---|"]
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for name, s in result["variants"].items():
        rows.append(f"| {name} | {s['requests']} | {s['errors']} | {f(s['tok_s'], 1)} | {f(s['ttft_p50_s'])} / "
                    f"{f(s['ttft_p95_s'])} | {f(s['itl_p50_ms'], 1)} / {f(s['itl_p95_ms'], 1)} |")
    if result["per_token_ms"]:
        rows.append("")
        rows.append("per token, one client alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in result["per_token_ms"].items()))
    for key in ("server_over_static_throughput", "session_over_static_throughput", "bls_over_inprocess_per_token"):
        if key in result:
            rows.append(f"{key}: {result[key]:.3f}")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    export_dir = args.export or serving_load.ensure_export(args.model, 8, 4, validate=not args.smoke,
                                                           progress=not args.smoke)
    result = run(args, export_dir)
    result.update(machine={"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count()},
                  date=datetime.date.today().isoformat(), export=str(export_dir),
                  workload={"clients": args.clients, "duration_s": args.duration, "prompt_tokens": args.prompt_tokens,
                            "images": args.images, "new_tokens": args.new_tokens})
    print(table(result))
    path = args.json or ROOT / "docs" / "triton-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
