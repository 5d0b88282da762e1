"""calibration.cache.cached_arrays: computes once per key, survives corrupt files, writes atomically,
and gives back exactly what was computed."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest

from calibration.cache import KEY_ARRAY, cache_path, cached_arrays

KEY = {"model": "m" * 64, "data": "d" * 64, "size": 16, "graph": "vision"}


class Counter:
    """compute() that counts its calls and returns fresh arrays each time."""

    def __init__(self, arrays=None):
        self.calls = 0
        self.arrays = arrays if arrays is not None else {"pixel_values": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}

    def __call__(self):
        self.calls += 1
        return {name: np.array(value, copy=True) for name, value in self.arrays.items()}


def files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_computes_once_per_key(tmp_path):
    compute = Counter()
    first = cached_arrays(KEY, compute, root=tmp_path)
    second = cached_arrays(dict(reversed(KEY.items())), compute, root=tmp_path)  # same key, other order
    assert compute.calls == 1
    np.testing.assert_array_equal(first["pixel_values"], second["pixel_values"])
    cached_arrays({**KEY, "size": 32}, compute, root=tmp_path)
    assert compute.calls == 2
    assert len(files(tmp_path / "calibration")) == 2


def test_hit_logs_reuse(tmp_path, caplog):
    cached_arrays(KEY, Counter(), root=tmp_path)
    with caplog.at_level(logging.INFO, logger="calibration.cache"):
        cached_arrays(KEY, Counter(), root=tmp_path)
    assert any("reusing cached calibration tensors" in r.getMessage() for r in caplog.records)


def test_values_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": np.array([np.nan, np.inf, -0.0, 65504], np.float16),
        "f64": rng.standard_normal(7),
        "i64": np.array([[-(2**62), 2**62]], np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.float32(3.25),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(40, dtype=np.int32).reshape(5, 8)[:, ::3],
        "fortran": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        "file": np.ones(2),  # names that are np.savez's own keyword arguments
        "allow_pickle": np.zeros(2),
    }
    compute = Counter(arrays)
    fresh = cached_arrays(KEY, compute, root=tmp_path)
    loaded = cached_arrays(KEY, compute, root=tmp_path)
    assert compute.calls == 1
    for result in (fresh, loaded):
        assert sorted(result) == sorted(arrays)
        for name, expected in arrays.items():
            got = result[name]
            assert got.dtype == np.asarray(expected).dtype and got.shape == np.shape(expected), name
            np.testing.assert_array_equal(got, expected, strict=True, err_msg=name)
            assert got.tobytes() == np.ascontiguousarray(expected).tobytes(), name  # bit-exact, -0.0 and NaN too


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"not a zip file"),
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        lambda p: p.write_bytes(b""),
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_corrupt_file_is_deleted_and_recomputed(tmp_path, caplog, damage):
    compute = Counter()
    cached_arrays(KEY, compute, root=tmp_path)
    path = cache_path(KEY, tmp_path)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="calibration.cache"):
        result = cached_arrays(KEY, compute, root=tmp_path)
    assert compute.calls == 2
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(result["pixel_values"], compute.arrays["pixel_values"])
    cached_arrays(KEY, compute, root=tmp_path)  # the rewritten file is good again
    assert compute.calls == 2


def test_file_made_for_another_key_is_a_miss(tmp_path):
    other = {**KEY, "graph": "decoder"}
    cached_arrays(other, Counter({"x": np.ones(3)}), root=tmp_path)
    cache_path(KEY, tmp_path).write_bytes(cache_path(other, tmp_path).read_bytes())  # as if a hash collided
    compute = Counter({"x": np.zeros(3)})
    result = cached_arrays(KEY, compute, root=tmp_path)
    assert compute.calls == 1
    np.testing.assert_array_equal(result["x"], np.zeros(3))
    with np.load(cache_path(KEY, tmp_path)) as npz:  # overwritten, now stamped with its own key
        assert '"graph":"vision"' in str(npz[KEY_ARRAY])


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    cached_arrays(KEY, Counter(), root=tmp_path)
    assert files(tmp_path / "calibration") == [cache_path(KEY, tmp_path).name]

    # A write that fails at the rename leaves neither a temp file nor a partial cache file behind.
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("runtime.files.os.replace", boom)
    before = files(tmp_path / "calibration")
    other = {**KEY, "size": 1}
    result = cached_arrays(other, Counter(), root=tmp_path)  # still returns the computed arrays
    assert "pixel_values" in result
    assert files(tmp_path / "calibration") == before


def test_failing_compute_writes_nothing(tmp_path):
    def compute():
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        cached_arrays(KEY, compute, root=tmp_path)
    assert files(tmp_path / "calibration") == []


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEFICS_TOOLKIT_CACHE", str(tmp_path / "elsewhere"))
    cached_arrays(KEY, Counter())
    stored = files(tmp_path / "elsewhere" / "calibration")
    assert len(stored) == 1 and stored[0].endswith(".npz")
    with zipfile.ZipFile(tmp_path / "elsewhere" / "calibration" / stored[0]) as zf:
        assert sorted(zf.namelist()) == [f"{KEY_ARRAY}.npy", "pixel_values.npy"]


@pytest.mark.parametrize(
    "key, compute, error",
    [
        ({"model": object()}, Counter(), TypeError),
        ({"x": float("nan")}, Counter(), TypeError),
        (KEY, lambda: {KEY_ARRAY: np.ones(1)}, ValueError),
        (KEY, lambda: {"names": np.array(["a", None], dtype=object)}, ValueError),
    ],
    ids=["unserialisable-key", "nan-key", "reserved-name", "object-array"],
)
def test_bad_keys_and_arrays_are_refused(tmp_path, key, compute, error):
    with pytest.raises(error):
        cached_arrays(key, compute, root=tmp_path)
    assert files(tmp_path / "calibration") == []


def test_corrupt_file_is_deleted_even_when_the_rewrite_fails(tmp_path, monkeypatch):
    compute = Counter()
    cached_arrays(KEY, compute, root=tmp_path)
    cache_path(KEY, tmp_path).write_bytes(b"garbage")

    def boom(*args, **kwargs):
        raise OSError("read-only disk")

    monkeypatch.setattr("runtime.files.os.replace", boom)
    cached_arrays(KEY, compute, root=tmp_path)
    assert compute.calls == 2
    assert files(tmp_path / "calibration") == []  # no corrupt file left to trip the next run
