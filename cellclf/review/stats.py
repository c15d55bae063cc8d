"""Reviewer throughput and inter-reviewer agreement for the admin page (pure maths + one query).

Reads the append-only audit of :mod:`cellclf.review.store`; writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

IDLE_GAP_S = 600.0


def labels_per_hour(times: Sequence[float], idle_gap_s: float = IDLE_GAP_S) -> float | None:
    """Labels per hour of active work: gaps longer than ``idle_gap_s`` (breaks) are left out.

    Each gap ≤ ``idle_gap_s`` between consecutive labels counts as one label made in that time.
    ``[0, 60, 120, 10000, 10030]`` → 3 labels in 150 s active → 72.0. None when there is no
    active interval (fewer than two labels close together).
    """
    ts = sorted(times)
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False) if b - a <= idle_gap_s]
    active = sum(gaps)
    if not gaps or active <= 0:
        return None
    return len(gaps) / active * 3600.0


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's κ of two raters over the same items; None when undefined (no items, or both
    raters always give one and the same label, so chance agreement is 1)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if pe >= 1.0:
        return None
    return (po - pe) / (1.0 - pe)


def agreement(votes: Mapping[int, Mapping[str, str]]) -> dict[str, Any]:
    """Agreement over cells labelled by ≥ 2 reviewers.

    Returns ``{n_items, agree_rate, pairs: [{a, b, n, agree_rate, kappa}]}``; ``agree_rate`` is
    the share of cells on which all their reviewers gave the same label.
    """
    multi = {i: v for i, v in votes.items() if len(v) >= 2}
    n_agree = sum(len(set(v.values())) == 1 for v in multi.values())
    reviewers = sorted({r for v in multi.values() for r in v})
    pairs = []
    for ra, rb in combinations(reviewers, 2):
        both = [(v[ra], v[rb]) for v in multi.values() if ra in v and rb in v]
        if not both:
            continue
        la, lb = [x for x, _ in both], [y for _, y in both]
        pairs.append({"a": ra, "b": rb, "n": len(both),
                      "agree_rate": sum(x == y for x, y in both) / len(both),
                      "kappa": cohen_kappa(la, lb)})
    return {"n_items": len(multi), "agree_rate": n_agree / len(multi) if multi else None,
            "pairs": pairs}


def reviewer_stats(audit_rows: Sequence[Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
    """Per reviewer: labels, undos, labels/hour (active), labels in the last hour, last active."""
    by: dict[str, dict[str, Any]] = {}
    for r in audit_rows:
        s = by.setdefault(r["reviewer"], {"reviewer": r["reviewer"], "labels": 0, "undos": 0,
                                          "times": [], "last_at": None})
        if r["action"] == "undo":
            s["undos"] += 1
        else:
            s["labels"] += 1
            s["times"].append(r["at"])
        s["last_at"] = r["at"] if s["last_at"] is None else max(s["last_at"], r["at"])
    out = []
    for name in sorted(by):
        s = by[name]
        times = s.pop("times")
        s["per_hour"] = labels_per_hour(times)
        s["last_hour"] = sum(t >= now - 3600 for t in times)
        out.append(s)
    return out
