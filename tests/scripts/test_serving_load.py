"""scripts/serving_load.py: a --smoke run of every scenario on the embedded tiny model, its JSON and
PNG, and the concurrent scenarios' tokens against the sequential ones and against the single-request
loop (which has no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime import Session
from runtime.loop import Timings, generate_tokens
from runtime.sampling import SamplingConfig
from runtime.session import check_request
from tests.util import load_script


@pytest.fixture(scope="module")
def serving():
    return load_script("serving_load")


@pytest.fixture(scope="module")
def smoke(serving, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving")
    serving.main(["--smoke", "--json", str(folder / "serving.json"), "--png", str(folder / "serving.png")])
    return folder, json.loads((folder / "serving.json").read_text())


def expected_requests(settings: dict) -> dict[str, int]:
    mixed, target = settings["requests"], settings["target_batch"]
    return dict(sequential=mixed, poisson=mixed, closed=mixed, static=mixed, concurrent8=target, static8=target,
                sequential8=target, chat=settings["chat_turns"], join=settings["join_repeats"])


def check_requests(summary: dict, count: int, vocab: int, lengths=None) -> None:
    records = summary["requests_detail"]
    assert summary["requests"] == len(records) == count
    assert summary["errors"] == 0 and all(r["error"] is None for r in records)
    for r in records:
        if lengths is not None:
            assert lengths[0] <= r["new_tokens"] <= lengths[1]
        assert len(r["tokens"]) == r["new_tokens"]  # exactly the tokens asked (min_new_tokens)
        assert all(0 <= t < vocab for t in r["tokens"])
        assert len(r["itl_s"]) == r["new_tokens"] - 1 and all(gap >= 0 for gap in r["itl_s"])
        assert 0 < r["ttft_s"] <= r["latency_s"]
    assert summary["tokens"] == summary["tokens_asked"] == sum(r["new_tokens"] for r in records)
    assert summary["seconds"] > 0 and summary["throughput_tok_s"] > 0
    assert summary["throughput_tok_s"] == pytest.approx(summary["tokens"] / summary["seconds"])
    assert 0 < summary["ttft_p50_s"] <= summary["ttft_p95_s"]
    assert 0 <= summary["itl_p50_s"] <= summary["itl_p95_s"]


def test_smoke_json_and_png(serving, smoke):
    folder, data = smoke
    assert (folder / "serving.png").stat().st_size > 0
    settings, scen = data["settings"], data["scenarios"]
    assert set(scen) == set(serving.SCENARIOS)
    vocab = 1024  # the embedded tiny model's logits width
    counts = expected_requests(settings)
    for name, s in scen.items():
        lengths = settings["new_tokens"] if name in ("sequential", "poisson", "closed", "static") else None
        check_requests(s, counts[name], vocab, lengths)
    for name in ("concurrent8", "static8", "sequential8", "join"):
        assert all(r["new_tokens"] == settings["target_tokens"] and r["prompt_tokens"] == settings["target_prompt"]
                   and r["images"] == 1 for r in scen[name]["requests_detail"])
    # the same requests in every mixed scenario
    def shape(name):
        records = scen[name]["requests_detail"]
        return sorted((r["id"], r["prompt_tokens"], r["images"], r["new_tokens"]) for r in records)

    shapes = {name: shape(name) for name in ("sequential", "poisson", "closed", "static")}
    assert len({tuple(v) for v in shapes.values()}) == 1
    assert scen["poisson"]["rate_per_s"] > 0 and scen["poisson"]["clients"] == settings["clients"] == 3

    machine = data["machine"]
    assert machine["date"] and machine["cpus"] >= 1 and machine["processor"] and machine["os"]
    assert data["targets"].keys() == serving.TARGETS.keys()


def test_smoke_chat_reuses_the_image(smoke):
    _, data = smoke
    settings, turns = data["settings"], data["scenarios"]["chat"]["turns"]
    assert [t["turn"] for t in turns] == list(range(1, settings["chat_turns"] + 1))
    assert turns[0]["cached_images"] == 0 and turns[0]["vision_perceiver_s"] > 0
    for before, turn in zip(turns, turns[1:]):
        assert turn["cached_images"] == 1
        assert turn["vision_perceiver_s"] == 0 and turn["vision"] == 0 and turn["perceiver"] == 0
        assert turn["prompt_tokens"] == before["prompt_tokens"] + settings["chat_tokens"] + settings["chat_question"]
    assert data["ratios"]["chat_later_turns_vision_perceiver_s"] == 0
    assert data["ratios"]["chat_later_turns_cached_images"] == [1] * (len(turns) - 1)
    assert data["targets"]["chat_later_turns_vision_perceiver_s"]["met"] is True


def test_smoke_join_and_ratios(smoke):
    _, data = smoke
    scen, ratios = data["scenarios"], data["ratios"]
    join = scen["join"]
    assert join["background"] == data["settings"]["join_background"]
    assert all(r["decoding_when_sent"] == join["background"] for r in join["requests_detail"])
    assert join["solo"]["requests"] == join["repeats"] and join["solo"]["errors"] == 0
    assert ratios["join_over_solo_ttft"] == pytest.approx(join["joined_ttft_median_s"] / join["solo_ttft_median_s"])
    assert ratios["concurrent8_over_static8_throughput"] == pytest.approx(
        scen["concurrent8"]["throughput_tok_s"] / scen["static8"]["throughput_tok_s"])
    assert all(r["batch_rows"] == data["settings"]["target_batch"] for r in scen["static8"]["requests_detail"])


def test_concurrent_tokens_equal_sequential(smoke):
    """Greedy: whatever else ran in the same decode steps, each request gets its sequential tokens."""
    _, data = smoke
    scen = data["scenarios"]

    def tokens(name):
        return {r["id"]: r["tokens"] for r in scen[name]["requests_detail"]}

    for concurrent, alone in (("poisson", "sequential"), ("closed", "sequential"), ("concurrent8", "sequential8")):
        assert tokens(concurrent) == tokens(alone), concurrent


def test_sequential_tokens_equal_the_single_request_loop(serving, smoke):
    """The workload rebuilt from the seed, run by runtime.loop.generate_tokens (its own cache, no engine)."""
    _, data = smoke
    settings = data["settings"]
    session = Session(data["export"])
    try:
        workload = serving.Workload(session.manifest, settings["seed"])
        items = workload.mixed(settings["requests"], tuple(settings["prompt_tokens"]), tuple(settings["images"]),
                               tuple(settings["new_tokens"]))
        recorded = {r["id"]: r for r in data["scenarios"]["sequential"]["requests_detail"]}
        for item in items:
            r = recorded[item.id]
            assert (r["prompt_tokens"], r["images"], r["new_tokens"]) == (item.prompt_tokens, item.images,
                                                                          item.new_tokens)
            cfg = SamplingConfig(max_new_tokens=item.new_tokens, min_new_tokens=item.new_tokens)
            request = check_request(session.manifest, **item.inputs())
            steps = list(generate_tokens(session.graphs, request, cfg, Timings()))
            assert [int(s.tokens[0]) for s in steps] == r["tokens"], item.id
    finally:
        session.close()


def test_batch_inputs_left_pads(serving):
    class Info:
        vocab_size, image_token_ids, bos_token_id, image_size = 50, (48, 47), 1, 4

    class Limits:
        max_images, max_seq_len = 4, 64

    class Manifest:
        model, limits = Info, Limits

    workload = serving.Workload(Manifest, seed=3)
    workload.photos = []  # random pixels: no photo loading here
    a, b = workload.item(12, 2, 5), workload.item(7, 0, 3)
    assert list(a.input_ids[[1, 2, 3]]) == [47, 48, 47] and a.image_mask[:2].sum() == 0
    assert a.image_mask[2:, 0].tolist()[:4] == [1, 1, 1, 1] and a.image_mask[-1].tolist() == [0, 1]
    batch = serving.batch_inputs([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 12) and batch["pixel_values"].shape == (2, 2, 3, 4, 4)
    assert batch["attention_mask"][1].tolist() == [0] * 5 + [1] * 7
    assert (batch["input_ids"][1, 5:] == b.input_ids).all() and not batch["image_attention_mask"][1].any()
    assert not batch["pixel_values"][1].any()
    np.testing.assert_array_equal(batch["image_attention_mask"][0], a.image_mask)


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--new-tokens", "9", "3"], ["--rate", "0"],
                                  ["--arrivals", "burst"], ["--prompt-tokens", "1", "4"]])
def test_refused_options(serving, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        serving.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_defaults(serving):
    real, smoke = serving.parse_args([]), serving.parse_args(["--smoke", "--clients", "5"])
    assert (real.model, real.clients, real.requests, real.target_batch, real.target_prompt, real.target_tokens) == (
        "random:medium", 8, 32, 8, 48, 32)
    assert real.json.name == "serving-cpu.json" and real.png.name == "serving-cpu.png"
    assert real.json.parent.name == "docs"
    assert (smoke.model, smoke.clients, smoke.requests) == ("default", 5, 5)  # an option given beats --smoke


def test_compare_prefill_chunk_smoke(serving, tmp_path):
    # the chunked-join comparison (docs/serving-chunked-cpu.json) at the smoke size: every request of
    # every configuration gets the sequential run's tokens, and the table's figures are there
    path = tmp_path / "chunked.json"
    data = serving.main(["--smoke", "--compare-prefill-chunk", "3", "--compare-rounds", "2", "--arrivals", "closed",
                         "--json", str(path)])
    assert json.loads(path.read_text())["ratios"] == data["ratios"]
    assert set(data["configs"]) == {"unchunked", "chunk 3"}
    assert [(r["prefill_chunk"], r["round"]) for r in data["runs"]] == [(None, 1), (3, 1), (3, 2), (None, 2)]
    for config in data["configs"].values():
        s = config["all"]
        assert s["errors"] == 0 and s["requests"] == 2 * data["settings"]["requests"]
        assert s["tokens_match_sequential"]["same"] == s["tokens_match_sequential"]["of"] == s["requests"]
        assert 0 < s["ttft_p50_s"] <= s["ttft_p95_s"] <= s["ttft_p99_s"]
        assert 0 <= s["itl_p50_s"] <= s["itl_p95_s"] <= s["itl_p99_s"] and s["decode_step_p50_s"] > 0
    assert data["ratios"]["chunk3_over_unchunked_throughput"] > 0
    assert set(data["targets"]) == {"chunk3_itl_p95_over_decode_step", "chunk3_over_unchunked_throughput"}
