"""Many reviewers at once: 8 worker processes × 500 claim-and-label operations on one store,
SQLite and a real PostgreSQL server. Checked from the audit table: no label lost, no cell labelled
by two reviewers, every label by the reviewer who held the cell."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter

import pytest

from cellclf.review.store import ReviewItem, ReviewStore

WORKERS = 8
OPS = 500
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
       b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef"
       b"\x00\x00\x00\x00IEND\xaeB`\x82")


def _worker(url: str, name: str, ops: int, barrier, out: mp.Queue) -> None:
    st = ReviewStore(url)
    done: list[tuple[int, str]] = []
    classes = st.labels
    barrier.wait(timeout=120)  # start together so the claims really race
    try:
        for k in range(ops):
            item = st.claim(name, lease_s=600)
            if item is None:
                break
            label = classes[(item.id + k) % len(classes)]
            st.label(name, item.id, label)
            done.append((item.id, label))
        out.put((name, done, None))
    except Exception as exc:  # reported to the parent, which fails the test
        out.put((name, done, f"{type(exc).__name__}: {exc}"))
    finally:
        st.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.slow
def test_parallel_reviewers_never_share_or_lose_a_cell(backend, tmp_path, request):
    if backend == "sqlite":
        url = str(tmp_path / "race.sqlite")
    else:
        url = request.getfixturevalue("pg").new_database("race")
    st = ReviewStore(url)
    n_items = WORKERS * OPS + 50
    st.add_items(ReviewItem("race", i, float(i), 0.0, "other", {"other": 0.5},
                            ["other"], "low_confidence", float(i % 97), PNG, PNG)
                 for i in range(n_items))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_worker, args=(url, f"r{w}", OPS, barrier, out))
             for w in range(WORKERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [f"{name}: {err}" for name, _, err in results if err]
    assert not errors, errors

    claimed = {(name, item_id, label) for name, done, _ in results for item_id, label in done}
    assert len(claimed) == WORKERS * OPS, "every worker finished its 500 operations"
    audit = st.audit()
    assert {(r["reviewer"], r["item_id"], r["label"]) for r in audit} == claimed, \
        "no label lost, none invented: the audit holds exactly the labels the workers made"
    per_item = Counter(r["item_id"] for r in audit)
    assert max(per_item.values()) == 1, "no cell was labelled by two reviewers"
    assert st.progress() == {"total": n_items, "done": WORKERS * OPS, "pending": 50,
                             "claimed": 0}
    per_worker = Counter(r["reviewer"] for r in audit)
    assert sorted(per_worker.values()) == [OPS] * WORKERS
