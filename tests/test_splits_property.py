"""Property tests of the split assignment (hypothesis): exact stratified counts, stability."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from embedtl.data._splits import SPLITS, _cut
from embedtl.data._splits import assign_splits as _assign_splits

fractions = st.sampled_from([(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)])


@given(n=st.integers(0, 500), fr=fractions)
def test_cut_preserves_the_total_and_follows_the_fractions(n, fr):
    counts = _cut(n, fr)
    assert sum(counts) == n
    nonzero = [i for i, f in enumerate(fr) if f > 0]
    for i, f in enumerate(fr):
        if f == 0:
            assert counts[i] == 0
        elif n >= len(nonzero):
            assert counts[i] >= 1  # every requested split gets a row when there are enough
        assert abs(counts[i] - f * n) <= len(fr)


names = st.lists(
    st.text("abcdefghij/", min_size=1, max_size=12), min_size=1, max_size=60, unique=True
)


@settings(max_examples=60)
@given(paths=names, seed=st.integers(0, 3), extra=st.text("klmnop", min_size=1, max_size=8))
def test_assignment_is_deterministic_stratified_and_stable_under_an_add(paths, seed, extra):
    items = [(p, i % 3) for i, p in enumerate(paths)]
    a = _assign_splits(items, SPLITS, (0.7, 0.15, 0.15), seed)
    assert a == _assign_splits(list(reversed(items)), SPLITS, (0.7, 0.15, 0.15), seed)
    for label in range(3):
        members = [p for p, lab in items if lab == label]
        got = [a[p] for p in members]
        assert [got.count(s) for s in SPLITS] == _cut(len(members), (0.7, 0.15, 0.15))
    if extra in paths:
        return
    b = _assign_splits([*items, (extra, 0)], SPLITS, (0.7, 0.15, 0.15), seed)
    moved = [p for p in a if a[p] != b[p]]
    assert len(moved) <= 2
