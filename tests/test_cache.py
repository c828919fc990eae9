"""Tests of transforms.cache: the bound, the eviction order and the counts of a BoundedCache."""

from __future__ import annotations

import pytest

from lpips_pipe.transforms.cache import BoundedCache


def test_bounded_cache_stays_in_bound_and_evicts_least_recently_used():
    cache = BoundedCache(100)
    for key in range(10):
        cache.put(key, f"v{key}", 30)
        assert cache.bytes_used <= 100
    assert len(cache) == 3 and cache.evictions == 7
    assert cache.get(9) == "v9" and cache.get(0) is None
    cache.get(7)  # now most recent: 8 goes first
    cache.put("big", "x", 101)  # larger than the bound: not kept, nothing evicted
    assert "big" not in cache and len(cache) == 3
    cache.put("new", "y", 30)
    assert "8" not in cache and 8 not in cache and 7 in cache and cache.bytes_used == 90
    assert (cache.hits, cache.misses) == (2, 1)
    with pytest.raises(ValueError):
        BoundedCache(-1)
