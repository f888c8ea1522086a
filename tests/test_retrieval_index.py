"""The HNSW index over cached bi-encoder encodings: finds the exact top K on easy data, is
cached in faiss's own format, reused while its key holds and rebuilt when anything changes."""
import json
import os

import pytest
import torch

import parlai_poly.retrieval_index as retrieval_index
from parlai_poly.retrieval_index import HnswIndexStore, build_hnsw, search

faiss = pytest.importorskip("faiss")
KEY = {"candidate_file_sha256": "a" * 64, "weights_sha256": "b" * 64, "num_candidates": 3000}


def clustered(n, dim=16, seed=0):
    """Candidates around 50 topics, as sentence encodings cluster; queries near candidates."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(50, dim, generator=gen)
    return centers[torch.randint(0, 50, (n,), generator=gen)] + 0.5 * torch.randn(n, dim, generator=gen)


def test_search_with_a_wide_ef_finds_the_exact_top_k():
    encs = clustered(3000)
    queries = encs[:20] + 0.1 * torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    index = build_hnsw(encs, m=16, ef_construction=100, threads=1)
    found = search(index, queries, 10, ef_search=500)  # [20, 10]
    exact = (queries @ encs.t()).topk(10, dim=1).indices
    assert found.shape == (20, 10) and found.dtype == torch.int64
    assert [set(row) for row in found.tolist()] == [set(row) for row in exact.tolist()]


@pytest.fixture
def counted_builds(monkeypatch):
    calls = []
    original = retrieval_index.build_hnsw

    def counting(encs, *args, **kwargs):
        calls.append(len(encs))
        return original(encs, *args, **kwargs)

    monkeypatch.setattr(retrieval_index, "build_hnsw", counting)
    return calls


def index_files(folder):
    return sorted(name for name in os.listdir(folder) if ".hnsw" in name)


def test_index_is_cached_then_reused_and_rebuilt_when_its_key_changes(tmp_path, counted_builds):
    encs = clustered(3000)
    prefix = str(tmp_path / "model.cands-replies-0123456789")
    first = HnswIndexStore(prefix, m=16)
    index = first.get(KEY, encs)
    assert first.status == "built" and counted_builds == [3000] and index.ntotal == 3000
    names = index_files(tmp_path)
    assert len(names) == 2 and names[0].endswith(".faiss") and names[1].endswith(".hnsw.json")
    with open(tmp_path / names[0], "rb") as f:
        assert f.read(4) == b"IHNf"  # faiss's own IndexHNSWFlat record, not a pickle
    manifest = json.loads((tmp_path / names[1]).read_text())
    assert manifest["key"]["candidates"] == KEY and manifest["num_vectors"] == 3000

    again = HnswIndexStore(prefix, m=16)
    reused = again.get(KEY, encs)
    assert again.status == "reused" and counted_builds == [3000]
    query = encs[:3]
    assert torch.equal(search(reused, query, 5, 64), search(index, query, 5, 64))

    # other weights or candidates (the candidate store's key), or other graph settings
    for store, key in (
        (HnswIndexStore(prefix, m=16), dict(KEY, weights_sha256="c" * 64)),
        (HnswIndexStore(prefix, m=8), dict(KEY, weights_sha256="c" * 64)),
        (HnswIndexStore(prefix, m=8, ef_construction=80), dict(KEY, weights_sha256="c" * 64)),
        (HnswIndexStore(prefix, m=8, ef_construction=80), dict(KEY, candidate_file_sha256="d" * 64)),
    ):
        store.get(key, encs)
        assert store.status == "built" and store.reason.startswith("no index")  # another file name
        assert len([n for n in index_files(tmp_path) if n.endswith(".faiss")]) == 1  # older ones removed
    assert len(counted_builds) == 5


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garble(path):
    """Same size, unreadable: the manifest's size check passes, faiss must refuse it."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(bytes(range(7, 71)))  # not -1: unused neighbour slots already hold 0xff


def bad_manifest(path):
    with open(path.rsplit(".hnsw-", 1)[0] + ".hnsw.json", "w") as f:
        f.write('{"format": ')


@pytest.mark.parametrize("damage", [truncate, garble, bad_manifest])
def test_damaged_index_is_rebuilt(tmp_path, damage, counted_builds):
    encs = clustered(3000)
    prefix = str(tmp_path / "model.cands-replies-0123456789")
    HnswIndexStore(prefix, m=16).get(KEY, encs)
    damage(str(tmp_path / index_files(tmp_path)[0]))
    store = HnswIndexStore(prefix, m=16)
    index = store.get(KEY, encs)
    assert store.status == "built" and index.ntotal == 3000 and len(counted_builds) == 2
    assert HnswIndexStore(prefix, m=16).get(KEY, encs).ntotal == 3000 and len(counted_builds) == 2


def test_without_a_prefix_the_index_stays_in_memory(tmp_path):
    store = HnswIndexStore(None, m=16)
    assert store.get(KEY, clustered(500)).ntotal == 500 and store.status == "memory"
