"""Blending: greedy interleaving equals megatron-core's (fixed and random weights, C kernel and
Python loop), tracks the weights, real blended datasets."""
import glob
import importlib.util
import os

import numpy as np
import pytest

from megagpt.data import BlendedDataset, DataConfig, build_gpt_datasets
from megagpt.data import blend
from megagpt.data.blend import blending_indices, blending_indices_python, normalise_weights
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.errors import MegaGPTError

WEIGHT_SETS = [[0.7, 0.3], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.01, 0.99], [0.1, 0.2, 0.3, 0.15, 0.25]]


def write_shard(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def megatron_helpers():
    spec = importlib.util.find_spec("megatron")
    if spec is None:
        pytest.skip("megatron-core not installed")
    so = glob.glob(os.path.join(spec.submodule_search_locations[0], "core", "datasets", "helpers_cpp*.so"))
    mspec = importlib.util.spec_from_file_location("helpers_cpp", so[0])
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_equals_megatron_core(weights):
    n = 20000
    ref_index, ref_sample = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.int64)
    megatron_helpers().build_blending_indices(ref_index, ref_sample, np.array(weights), len(weights), n, False)
    index, sample = blending_indices(weights, n)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(sample, ref_sample)


def megatron_indices(weights, n):
    ref_index, ref_sample = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.int64)
    megatron_helpers().build_blending_indices(ref_index, ref_sample, np.asarray(weights, dtype=np.float64),
                                              len(weights), n, False)
    return ref_index, ref_sample


def random_weights(rng):
    """Weights nobody picked: 2-10 datasets, plain random, with exact ties, with tiny members
    (down to 1e-7), or small integer ratios (many exactly tied errors); normalised the way
    ``BlendedDataset`` does it (half the time) or raw."""
    nd = int(rng.integers(2, 11))
    kind = rng.integers(4)
    if kind == 0:
        w = rng.random(nd) + 1e-3
    elif kind == 1:  # ties: values drawn from a short list
        w = rng.choice(rng.random(max(1, nd // 2)) + 1e-3, nd)
    elif kind == 2:  # tiny members beside ordinary ones
        w = rng.random(nd) + 1e-3
        w[rng.random(nd) < 0.4] = 10.0 ** rng.uniform(-7, -3)
    else:
        w = rng.integers(1, 5, nd).astype(np.float64)
    return np.asarray(normalise_weights(w) if rng.random() < 0.5 else w / w.sum(), dtype=np.float64)


def test_random_weights_equal_megatron_core():
    """300 random weight vectors, n up to 300k, plus three at 3M samples: every index equal."""
    rng = np.random.default_rng(12345)
    cases = [(random_weights(rng), int(rng.integers(1, 300_000))) for _ in range(300)]
    cases += [(random_weights(rng), 3_000_000) for _ in range(3)]
    for w, n in cases:
        ref_index, ref_sample = megatron_indices(w, n)
        index, sample = blending_indices(w, n)
        assert index.dtype == np.int32 and sample.dtype == np.int64 and index.shape == (n,)
        if not (np.array_equal(index, ref_index) and np.array_equal(sample, ref_sample)):
            k = int(np.argmax((index != ref_index) | (sample != ref_sample)))
            pytest.fail(f"weights {w.tolist()!r}, n={n}: first difference at sample {k}: "
                        f"ours ({index[k]}, {sample[k]}), megatron ({ref_index[k]}, {ref_sample[k]})")


def test_python_loop_equals_kernel():
    """The fallback and the C kernel agree (the Python loop is the statement of the rule)."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        w, n = random_weights(rng), int(rng.integers(1, 5000))
        for got, want in zip(blending_indices_python(w, n), blending_indices(w, n)):
            np.testing.assert_array_equal(got, want)
    assert [a.tolist() for a in blending_indices([0.5, 0.5], 0)] == [[], []]


def test_no_compiler_falls_back_to_python(tmp_path, monkeypatch):
    """Without a C compiler the blend still builds (same result) and says once why it is slow."""
    monkeypatch.setattr(blend, "_kernel", None)
    monkeypatch.setenv("MEGAGPT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="could not build the C blend kernel.*Python loop"):
        index, sample = blending_indices([0.2, 0.5, 0.3], 3000)
    ref_index, ref_sample = megatron_indices([0.2, 0.5, 0.3], 3000)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(sample, ref_sample)


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_every_prefix_tracks_weights(weights):
    n = 20000
    index, sample = blending_indices(weights, n)
    onehot = index[:, None] == np.arange(len(weights))[None, :]
    counts = np.cumsum(onehot, axis=0)  # counts[k, d]: draws from d among the first k+1
    expected = np.arange(1, n + 1)[:, None] * np.asarray(weights)[None, :]
    assert np.abs(counts - expected).max() <= 1.0 + 1e-9
    final = counts[-1] / n
    assert np.abs(final - weights).max() < 0.01 * min(weights) + 1 / n
    for d in range(len(weights)):  # each dataset's samples are taken in order, none twice
        np.testing.assert_array_equal(sample[index == d], np.arange(counts[-1, d]))


def test_blended_gpt_datasets_follow_weights(tmp_path):
    rng = np.random.default_rng(0)
    # shard a uses token ids < 500, shard b ids >= 500: every sample tells where it came from
    a = write_shard(tmp_path / "a", [rng.integers(0, 500, rng.integers(5, 60)) for _ in range(300)])
    b = write_shard(tmp_path / "b", [rng.integers(500, 1000, rng.integers(5, 60)) for _ in range(300)])
    cfg = DataConfig([0.7, a, 0.3, b], split="90,10,0", seq_length=16, seed=3)
    n = 3000
    train, valid, test = build_gpt_datasets(cfg, (n, 100, 0), vocab_size=1000)
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset) and test is None
    assert len(train) == n and len(valid) == 100
    from_b = np.array([bool((train[i]["tokens"] >= 500).all()) for i in range(n)])
    from_a = np.array([bool((train[i]["tokens"] < 500).all()) for i in range(n)])
    assert (from_a ^ from_b).all()
    assert abs(from_a.mean() - 0.7) < 0.01 and abs(from_a[:100].sum() - 70) <= 1
    # no window is served twice (per-dataset sample indices are distinct)
    keys = {(int(d), int(s)) for d, s in zip(train.dataset_index, train.dataset_sample_index)}
    assert len(keys) == n
    # cached: a second build loads every array
    again, _, _ = build_gpt_datasets(cfg, (n, 100, 0), vocab_size=1000)
    assert not again.built_index and not any(d.built_index for d in again.datasets)
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)
    # prefixes without weights weigh 1 each
    even, _, _ = build_gpt_datasets(DataConfig([a, b], split="1,0,0", seq_length=16), (1000, 0, 0), vocab_size=1000)
    assert np.bincount(even.dataset_index).tolist() == [500, 500]


def test_blend_errors(tmp_path):
    rng = np.random.default_rng(1)
    a = write_shard(tmp_path / "a", [rng.integers(0, 100, 20) for _ in range(20)])
    train, _, _ = build_gpt_datasets(DataConfig([a], split="1,0,0", seq_length=8), (10, 0, 0), vocab_size=100)
    with pytest.raises(MegaGPTError, match="2 datasets but 1 weights"):
        BlendedDataset([train, train], [1.0], 10, seed=0)
    with pytest.raises(MegaGPTError, match="positive"):
        BlendedDataset([train, train], [1.0, -1.0], 10, seed=0)
    with pytest.raises(MegaGPTError, match=r"a.*has 10 samples but the blend draws 15"):
        BlendedDataset([train, train], [0.5, 0.5], 30, seed=0)


def test_unnormalised_weights_blend_like_their_normalised_form(tmp_path):
    """Weights like [3, 1] (the form the data_path list allows) draw exactly as [0.75, 0.25]; and a
    prefix with no documents in a split drops out of that split's blend, the others' weights
    renormalised (that path once passed raw weights: 'has 32 samples but the blend draws 55')."""
    rng = np.random.default_rng(2)
    a = write_shard(tmp_path / "a", [rng.integers(0, 500, 40) for _ in range(200)])
    b = write_shard(tmp_path / "b", [rng.integers(500, 1000, 40) for _ in range(200)])
    tiny = write_shard(tmp_path / "tiny", [rng.integers(0, 1000, 40) for _ in range(3)])
    train, _, _ = build_gpt_datasets(DataConfig([a], split="1,0,0", seq_length=16), (400, 0, 0), vocab_size=1000)
    other, _, _ = build_gpt_datasets(DataConfig([b], split="1,0,0", seq_length=16), (400, 0, 0), vocab_size=1000)
    raw = BlendedDataset([train, other], [3, 1], 400, seed=0)
    norm = BlendedDataset([train, other], [0.75, 0.25], 400, seed=0)
    np.testing.assert_array_equal(raw.dataset_index, norm.dataset_index)
    assert np.bincount(raw.dataset_index).tolist() == [300, 100]
    # 3 documents split 90,10,0 give the tiny prefix none in validation: the blend is a and b alone
    cfg = DataConfig([3, a, 1, b, 2, tiny], split="90,10,0", seq_length=16)
    _, valid, _ = build_gpt_datasets(cfg, (300, 100, 0), vocab_size=1000)
    prefixes = {valid.source(i)[0] for i in range(len(valid))}
    assert prefixes == {a, b}, prefixes
    assert abs(np.mean([valid.source(i)[0] == a for i in range(100)]) - 0.75) <= 0.01
