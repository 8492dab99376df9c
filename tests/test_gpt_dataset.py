"""GPTDataset / build_gpt_datasets: windows, epochs, shuffles, splits, index cache, bad inputs.

References are independent of the code under test: a plain Python concatenation of the documents
in ``doc_idx`` order (sample j must be ``stream[j*S : (j+1)*S + 1]``) and megatron-core's C++
``build_sample_idx``.
"""
import glob
import importlib.util
import json
import os
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp

from megagpt.data import DataConfig, GPTDataset, build_gpt_datasets, index_cache
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from megagpt.errors import MegaGPTError


def write_shard(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def random_docs(n, seed=0, vocab=1000, max_len=40, empty_every=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, int(rng.integers(1, max_len))) for _ in range(n)]
    for i in range(0, n, empty_every or n + 1):
        docs[i] = np.zeros(0, dtype=np.int64)
    return docs


def reference_stream(docs, doc_idx):
    return np.concatenate([np.asarray(docs[int(d)], dtype=np.int64) for d in doc_idx])


def test_one_epoch_covers_every_document_token_once(tmp_path):
    seq = 16
    docs = random_docs(60, seed=1, empty_every=17)
    total = sum(len(d) for d in docs)
    k = (total - 1) // seq + 1  # pad the last document so that the epoch is exactly k windows
    docs[-1] = np.concatenate([docs[-1], np.arange(k * seq + 1 - total) % 1000])
    prefix = write_shard(tmp_path / "s", docs)
    ds = GPTDataset(prefix, (0, 60), num_samples=k, seq_length=seq, seed=3)
    assert len(ds.doc_idx) == 60 and sorted(ds.doc_idx.tolist()) == list(range(60))  # one epoch
    stream = [ds.stream_sample(j) for j in range(k)]
    assert all(s.shape == (seq + 1,) and s.dtype == np.int64 for s in stream)
    assert all(a[-1] == b[0] for a, b in zip(stream, stream[1:]))  # one-token overlap
    joined = np.concatenate([s[:-1] for s in stream] + [stream[-1][-1:]])
    np.testing.assert_array_equal(joined, reference_stream(docs, ds.doc_idx))
    all_tokens = np.concatenate(docs).astype(np.int64)
    np.testing.assert_array_equal(np.bincount(joined, minlength=1000), np.bincount(all_tokens, minlength=1000))
    # __getitem__ is the same windows in shuffled order: a permutation of the stream samples
    assert sorted(ds.shuffle_idx.tolist()) == list(range(k))
    assert not np.array_equal(ds.shuffle_idx, np.arange(k))
    for i in range(k):
        np.testing.assert_array_equal(ds[i]["tokens"], stream[ds.shuffle_idx[i]])


def test_multi_epoch_windows_match_references(tmp_path):
    seq = 8
    docs = random_docs(25, seed=2, max_len=12, empty_every=7)
    prefix = write_shard(tmp_path / "s", docs)
    lo, hi, n = 5, 25, 100  # a sub-range of documents, several epochs
    ds = GPTDataset(prefix, (lo, hi), num_samples=n, seq_length=seq, seed=7)
    tokens_per_epoch = sum(len(docs[i]) for i in range(lo, hi))
    epochs = len(ds.doc_idx) // (hi - lo)
    assert epochs == -(-(n * seq + 1) // tokens_per_epoch) and epochs >= 3
    blocks = ds.doc_idx.reshape(epochs, hi - lo)
    for b in blocks:  # every epoch is a permutation of the range ...
        assert sorted(b.tolist()) == list(range(lo, hi))
    assert len({tuple(b.tolist()) for b in blocks}) == epochs  # ... in a different order each time
    stream = reference_stream(docs, ds.doc_idx)
    for j in range(n):
        np.testing.assert_array_equal(ds.stream_sample(j), stream[j * seq:(j + 1) * seq + 1])
    # the sample shuffle keeps epoch 0's windows ahead of the rest
    first = -(-tokens_per_epoch // seq)
    assert sorted(ds.shuffle_idx[:first].tolist()) == list(range(first))

    # megatron-core's C++ helper, loaded straight from its .so (its package import is slow)
    spec = importlib.util.find_spec("megatron")
    if spec is None:
        pytest.skip("megatron-core not installed")
    so = glob.glob(os.path.join(spec.submodule_search_locations[0], "core", "datasets", "helpers_cpp*.so"))
    mspec = importlib.util.spec_from_file_location("helpers_cpp", so[0])
    helpers = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(helpers)
    sizes = np.array([len(d) for d in docs], dtype=np.int32)
    ref = helpers.build_sample_idx_int32(sizes, ds.doc_idx.astype(np.int32), seq, epochs, tokens_per_epoch, True, 1)
    np.testing.assert_array_equal(ds.sample_idx, ref[:n + 1])


def test_seed_determinism_and_cache(tmp_path):
    prefix = write_shard(tmp_path / "s", random_docs(50, seed=3))
    kw = dict(num_samples=40, seq_length=16)
    a = GPTDataset(prefix, (0, 50), seed=1, cache_dir=tmp_path / "c1", **kw)
    assert a.built_index and a.paths["doc_idx"].parent == tmp_path / "c1"
    mtimes = {k: os.stat(p).st_mtime_ns for k, p in a.paths.items()}
    again = GPTDataset(prefix, (0, 50), seed=1, cache_dir=tmp_path / "c1", **kw)
    assert not again.built_index and again.paths == a.paths
    assert mtimes == {k: os.stat(p).st_mtime_ns for k, p in again.paths.items()}
    assert isinstance(again.doc_idx.base, np.memmap)  # mapped, not read into memory
    fresh = GPTDataset(prefix, (0, 50), seed=1, cache_dir=tmp_path / "c2", **kw)  # rebuilt elsewhere
    assert fresh.built_index
    for x, y in ((a, fresh), (a, again)):
        for k in ("doc_idx", "sample_idx", "shuffle_idx"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
        assert all(np.array_equal(x[i]["tokens"], y[i]["tokens"]) for i in range(40))
    other_seed = GPTDataset(prefix, (0, 50), seed=2, cache_dir=tmp_path / "c1", **kw)
    other_len = GPTDataset(prefix, (0, 50), num_samples=40, seq_length=8, seed=1, cache_dir=tmp_path / "c1")
    for o in (other_seed, other_len):
        assert o.built_index and o.paths["doc_idx"] != a.paths["doc_idx"]
    assert not np.array_equal(other_seed.doc_idx, a.doc_idx)
    assert not np.array_equal(other_seed.shuffle_idx, a.shuffle_idx)
    desc = json.loads(open(str(a.paths["doc_idx"]).replace("_doc_idx.npy", "_desc.json")).read())
    assert desc["seed"] == 1 and desc["shard"]["idx_sha256"] == index_cache.shard_fingerprint(prefix)["idx_sha256"]


def test_default_cache_next_to_data_with_fallback(tmp_path, monkeypatch):
    prefix = write_shard(tmp_path / "data" / "s", random_docs(20))
    ds = GPTDataset(prefix, (0, 20), num_samples=5, seq_length=8, seed=0)
    assert ds.cache_dir == tmp_path / "data" / "index-cache"
    # a read-only data directory (faked: tests may run as root) falls back to the user cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = index_cache._writable
    monkeypatch.setattr(index_cache, "_writable", lambda d: "data" not in str(d) and real(d))
    ds2 = GPTDataset(prefix, (0, 20), num_samples=5, seq_length=8, seed=0)
    assert ds2.cache_dir == tmp_path / "xdg" / "megagpt" / "index-cache" and ds2.built_index


def test_splits_disjoint_with_right_ratios(tmp_path):
    prefix = write_shard(tmp_path / "s", random_docs(1000, seed=4))
    cfg = DataConfig(data_path=[prefix], split="80,15,5", seq_length=16, seed=0)
    train, valid, test = build_gpt_datasets(cfg, num_samples=(50, 20, 10), vocab_size=1000)
    doc_sets = [set(np.asarray(d.doc_idx).tolist()) for d in (train, valid, test)]
    assert [len(s) for s in doc_sets] == [800, 150, 50]
    assert not (doc_sets[0] & doc_sets[1]) and not (doc_sets[0] & doc_sets[2]) and not (doc_sets[1] & doc_sets[2])
    assert set().union(*doc_sets) == set(range(1000))
    assert [len(d) for d in (train, valid, test)] == [50, 20, 10]
    # 0 documents (the default 969,30,1 on 100 docs leaves none for test) or 0 samples -> None
    small = write_shard(tmp_path / "small", random_docs(100))
    tr, va, te = build_gpt_datasets(DataConfig([small], seq_length=8), num_samples=(10, 0, 10), vocab_size=1000)
    assert tr is not None and va is None and te is None


def test_token_range_checked_once_and_named(tmp_path, monkeypatch):
    good = write_shard(tmp_path / "good", random_docs(30, vocab=500))
    calls = []
    real = IndexedDataset.check_token_range
    monkeypatch.setattr(IndexedDataset, "check_token_range", lambda self, v: calls.append(v) or real(self, v))
    cfg = DataConfig([good], split="1,0,0", seq_length=8)
    build_gpt_datasets(cfg, (10, 0, 0), vocab_size=500)
    build_gpt_datasets(cfg, (20, 0, 0), vocab_size=500)  # new index, same shard: check is cached
    assert calls == [500]
    with pytest.raises(MegaGPTError, match=r"good\.bin.*token id 4\d\d.*size 400"):
        build_gpt_datasets(cfg, (10, 0, 0), vocab_size=400)  # same shard, smaller vocab: rechecked
    docs = random_docs(30, vocab=500)
    docs[12][3] = 777
    bad = write_shard(tmp_path / "bad", docs)
    cfg = DataConfig([0.5, good, 0.5, bad], split="1,0,0", seq_length=8)
    with pytest.raises(MegaGPTError, match=r"bad\.bin.*token id 777"):
        build_gpt_datasets(cfg, (10, 0, 0), vocab_size=500)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data_path=["{d}/missing"]), r"missing.*missing\.bin"),
    (dict(data_path=["0.7", "{d}/a", "0.3"]), r"3 entries"),
    (dict(data_path=[0.7, "{d}/a", -0.3, "{d}/a"]), r"weight -0.3"),
    (dict(data_path=[0, "{d}/a"]), r"weight 0 "),
    (dict(data_path=["nan", "{d}/a"]), r"weight 'nan'"),
    (dict(data_path=[0.5, "{d}/a", "{d}/a", 0.5]), r"not a number|prefix"),
    (dict(data_path=[]), r"empty"),
    (dict(data_path=["{d}/a"], split="90,10"), r"split='90,10'"),
    (dict(data_path=["{d}/a"], split="90,-1,11"), r"split="),
    (dict(data_path=["{d}/a"], split="0,0,0"), r"split="),
    (dict(data_path=["{d}/a"], split="a,b,c"), r"split="),
    (dict(data_path=["{d}/a"], seq_length=0), r"seq_length=0"),
])
def test_config_errors(tmp_path, kwargs, match):
    write_shard(tmp_path / "a", random_docs(5))
    kwargs = {k: [x.format(d=tmp_path) if isinstance(x, str) else x for x in v] if k == "data_path" else v
              for k, v in kwargs.items()}
    with pytest.raises(MegaGPTError, match=match):
        DataConfig(**kwargs)


def test_config_forms(tmp_path):
    a, b = write_shard(tmp_path / "a", random_docs(5)), write_shard(tmp_path / "b", random_docs(5))
    assert DataConfig([a]).weights == [1.0]
    assert DataConfig([a, b]).weights == [0.5, 0.5]
    assert DataConfig(tmp_path / "a").prefixes == [a]  # a path-like prefix
    c = DataConfig(["3", a, "1", b], split="969,30,1")
    assert c.prefixes == [a, b] and c.weights == [0.75, 0.25]
    assert c.split_ratios == pytest.approx((0.969, 0.030, 0.001))
    with pytest.raises(MegaGPTError, match="num_samples"):
        build_gpt_datasets(c, (10, 0), vocab_size=1000)


def _rank_main(rank, world, port, prefix, bad_prefix, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = DataConfig([prefix], split="1,0,0", seq_length=16, seed=5, cache_dir=str(out_dir / "cache"))
        train, _, _ = build_gpt_datasets(cfg, (64, 0, 0), vocab_size=1000)
        result = {"built": train.built_index, "paths": {k: str(p) for k, p in train.paths.items()},
                  "tokens": [train[i]["tokens"].tolist() for i in range(64)]}
        try:  # a bad shard: rank 0 fails the check, rank 1 must get the same error, not hang
            build_gpt_datasets(DataConfig([bad_prefix], split="1,0,0", seq_length=16), (8, 0, 0), vocab_size=1000)
            result["error"] = None
        except MegaGPTError as e:
            result["error"] = str(e)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_rank0_builds_rank1_loads(tmp_path):
    prefix = write_shard(tmp_path / "s", random_docs(80, seed=6))
    docs = random_docs(20, seed=7)
    docs[5][0] = 1000
    bad = write_shard(tmp_path / "bad", docs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported torch instead of paying for the import again
    mp.start_processes(_rank_main, args=(2, port, prefix, bad, tmp_path), nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["built"] is True and r1["built"] is False
    assert r0["paths"] == r1["paths"] and r0["tokens"] == r1["tokens"]
    assert r0["error"] and r0["error"] == r1["error"] and "bad.bin" in r0["error"]


def test_real_shakespeare_shard(shakespeare_prefix):
    seq = 64
    shard = IndexedDataset(shakespeare_prefix)
    cfg = DataConfig([shakespeare_prefix], split="969,30,1", seq_length=seq, seed=11)
    n_docs = shard.num_documents
    probe, _, _ = build_gpt_datasets(cfg, (1, 0, 0), vocab_size=1000)
    lo, hi = probe.doc_range
    assert lo == 0 and abs(hi - 0.969 * n_docs) <= 1
    tokens_per_epoch = int(shard.sizes[shard.doc_idx[lo]:shard.doc_idx[hi]].sum())
    n = (tokens_per_epoch - 1) // seq  # exactly the windows of one epoch
    train, valid, test = build_gpt_datasets(cfg, (n, 10, 1), vocab_size=1000)
    assert sorted(np.asarray(train.doc_idx).tolist()) == list(range(lo, hi))
    stream = np.concatenate([shard[int(d)] for d in train.doc_idx]).astype(np.int64)
    joined = np.concatenate([train.stream_sample(j)[:-1] for j in range(n)])
    np.testing.assert_array_equal(joined, stream[:n * seq])
    assert len(stream) - n * seq <= seq  # the leftover is less than one more window
    seen = np.sort(np.asarray(train.shuffle_idx))
    np.testing.assert_array_equal(seen, np.arange(n))
    assert valid is not None and len(valid) == 10 and n_docs > 100
    assert set(np.asarray(valid.doc_idx).tolist()).isdisjoint(range(lo, hi))


def test_writer_refuses_ids_that_would_wrap(tmp_path):
    with IndexedDatasetWriter(tmp_path / "w", np.uint16) as w:
        w.add_document(np.array([0, 65535], dtype=np.int64))
        for bad in (np.array([1, 70000]), [5, -1]):
            with pytest.raises(MegaGPTError, match=r"w: token id (70000|-1) does not fit the shard dtype uint16"):
                w.add_document(bad)
    assert IndexedDataset(tmp_path / "w")[0].tolist() == [0, 65535]


def test_pickles_as_paths_for_dataloader_workers(tmp_path):
    import pickle

    import torch

    a = write_shard(tmp_path / "a", random_docs(200, seed=8, max_len=400))
    b = write_shard(tmp_path / "b", random_docs(200, seed=9, max_len=400))
    for path in ([a], [0.6, a, 0.4, b]):
        ds, _, _ = build_gpt_datasets(DataConfig(path, split="1,0,0", seq_length=32), (300, 0, 0), vocab_size=1000)
        blob = pickle.dumps(ds)
        assert len(blob) < 20_000  # the corpus and index arrays are not in the pickle
        back = pickle.loads(blob)
        assert all(np.array_equal(back[i]["tokens"], ds[i]["tokens"]) for i in range(300))
    # spawn-started DataLoader workers unpickle it and serve the same batches
    loader = torch.utils.data.DataLoader(ds, batch_size=50, num_workers=1, multiprocessing_context="spawn")
    got = torch.cat([x["tokens"] for x in loader])
    np.testing.assert_array_equal(got.numpy(), np.stack([ds[i]["tokens"] for i in range(300)]))
