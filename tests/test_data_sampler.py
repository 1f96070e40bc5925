"""BalancedSampler: US-JEPA Eq. 6 counts, rank split, determinism, mid-epoch resume."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usfm_core.data.sampler import BalancedSampler
from usfm_core.errors import ConfigError


def make_groups(sizes: list[int]) -> dict[str, list[int]]:
    """Data sets ``d0, d1, ...`` with consecutive global indices."""
    groups, start = {}, 0
    for k, n in enumerate(sizes):
        groups[f"d{k}"] = list(range(start, start + n))
        start += n
    return groups


def owner(groups: dict[str, list[int]]) -> dict[int, str]:
    return {i: name for name, idx in groups.items() for i in idx}


sizes_st = st.lists(st.integers(1, 40), min_size=1, max_size=5)
common = settings(max_examples=60, deadline=None)


@common
@given(sizes=sizes_st, cap=st.integers(1, 50), seed=st.integers(0, 2**16), epoch=st.integers(0, 6))
def test_counts_per_dataset_are_min_size_cap_without_repeats(sizes, cap, seed, epoch) -> None:
    groups = make_groups(sizes)
    sampler = BalancedSampler(groups, cap=cap, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert len(order) == len(sampler) == sum(min(n, cap) for n in sizes)
    counts = Counter(owner(groups)[i] for i in order)
    assert counts == {f"d{k}": min(n, cap) for k, n in enumerate(sizes)}
    assert len(set(order)) == len(order)  # without replacement within the epoch


@common
@given(
    sizes=sizes_st,
    cap=st.integers(1, 50),
    world_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 4),
)
def test_ranks_are_disjoint_and_cover_the_epoch(sizes, cap, world_size, seed, epoch) -> None:
    groups = make_groups(sizes)
    single = BalancedSampler(groups, cap=cap, seed=seed)
    single.set_epoch(epoch)
    drawn = list(single)
    per_rank = []
    for rank in range(world_size):
        s = BalancedSampler(groups, cap=cap, seed=seed, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    n_total = len(drawn)
    expected_len = -(-n_total // world_size)
    assert all(len(r) == expected_len for r in per_rank)
    merged = [i for r in per_rank for i in r]
    # Padding repeats fewer than world_size indices; without it the ranks are disjoint.
    assert set(merged) == set(drawn)
    extra = Counter(merged) - Counter(drawn)
    assert sum(extra.values()) == expected_len * world_size - n_total < world_size
    # Interleaving the ranks gives back the single-process order (+ padding).
    interleaved = [per_rank[k % world_size][k // world_size] for k in range(len(merged))]
    assert interleaved[:n_total] == drawn


@common
@given(sizes=sizes_st, cap=st.integers(1, 50), seed=st.integers(0, 2**16), epoch=st.integers(0, 5))
def test_order_is_a_function_of_seed_and_epoch(sizes, cap, seed, epoch) -> None:
    groups = make_groups(sizes)
    a = BalancedSampler(groups, cap=cap, seed=seed)
    b = BalancedSampler(dict(reversed(list(groups.items()))), cap=cap, seed=seed)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    assert list(a) == list(b)


def test_different_epochs_and_seeds_change_the_order() -> None:
    groups = make_groups([30, 20])
    s = BalancedSampler(groups, cap=25, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    assert list(BalancedSampler(groups, cap=25, seed=2)) != first


@common
@given(
    sizes=sizes_st,
    cap=st.integers(1, 50),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 4),
    data=st.data(),
)
def test_resume_from_state_dict_continues_the_same_order(
    sizes, cap, world_size, seed, epoch, data
) -> None:
    groups = make_groups(sizes)
    rank = data.draw(st.integers(0, world_size - 1))
    kwargs = {"cap": cap, "seed": seed, "rank": rank, "world_size": world_size}
    sampler = BalancedSampler(groups, **kwargs)
    sampler.set_epoch(epoch)
    full = list(sampler)
    stop = data.draw(st.integers(0, len(full)))
    sampler.set_epoch(epoch)
    it = iter(sampler)
    seen = [next(it) for _ in range(stop)]
    state = sampler.state_dict()
    assert state["start_index"] == stop

    resumed = BalancedSampler(groups, **kwargs)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - stop
    assert seen + list(resumed) == full
    # The next pass (same epoch, no set_epoch) starts from the beginning again.
    assert list(resumed) == full


def test_state_dict_with_consumed_count_overrides_prefetch_position() -> None:
    groups = make_groups([10, 7])
    s = BalancedSampler(groups, cap=8, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2)
    it = iter(s)
    for _ in range(10):  # e.g. a DataLoader prefetched 10, the trainer used 6
        next(it)
    state = s.state_dict(consumed=6)
    r = BalancedSampler(groups, cap=8, seed=3)
    r.load_state_dict(state)
    assert r.epoch == 2 and list(r) == full[6:]


def test_large_dataset_is_walked_without_repeats_across_epochs() -> None:
    groups = {"big": list(range(100)), "small": list(range(100, 105))}
    s = BalancedSampler(groups, cap=30, seed=0)
    seen: list[int] = []
    for epoch in range(3):  # 3 x 30 = 90 < 100 -> all different
        s.set_epoch(epoch)
        seen += [i for i in s if i < 100]
    assert len(seen) == 90 and len(set(seen)) == 90
    s.set_epoch(3)  # last epoch of the pass: 10 new ones + 20 from the next start
    last = [i for i in s if i < 100]
    assert len(set(last)) == 30
    assert set(seen) | set(last) == set(range(100))


def test_eq6_probabilities() -> None:
    groups = make_groups([1000, 200, 10])
    s = BalancedSampler(groups, cap=300, seed=0)
    counts = Counter(owner(groups)[i] for i in s)
    total = sum(counts.values())
    probs = {k: v / total for k, v in counts.items()}
    assert probs == pytest.approx({"d0": 300 / 510, "d1": 200 / 510, "d2": 10 / 510})


def test_no_shuffle_keeps_dataset_order() -> None:
    groups = make_groups([3, 2])
    s = BalancedSampler(groups, cap=None, shuffle=False)
    assert list(s) == [0, 1, 2, 3, 4]


def test_invalid_arguments_raise_config_errors() -> None:
    groups = make_groups([4])
    with pytest.raises(ConfigError, match="rank"):
        BalancedSampler(groups, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="empty"):
        BalancedSampler({"a": []})
    with pytest.raises(ConfigError, match="cap"):
        BalancedSampler(groups, cap=0)
    state = BalancedSampler(groups, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        BalancedSampler(groups, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="changed"):
        BalancedSampler(make_groups([5]), seed=1).load_state_dict(state)
