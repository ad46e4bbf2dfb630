import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from monai_amat.data import ForegroundOversampler, foreground_flags


def _datalist(n, foreground_every=5):
    items = []
    for i in range(n):
        label = np.zeros((1, 4, 4), dtype=np.float32)
        if i % foreground_every == 0:
            label[0, 1, 1] = 2
        items.append({"image": np.full((1, 4, 4), i, dtype=np.float32), "label": label, "index": i})
    return items


@pytest.mark.parametrize("batch_size", [3, 8, 16])
def test_every_batch_holds_a_third_foreground_over_an_epoch(batch_size):
    data = _datalist(50)  # 10 of 50 items have foreground: a plain shuffle gives batches without any
    flags = foreground_flags(data)
    assert sum(flags) == 10
    sampler = ForegroundOversampler(Dataset(data), flags, batch_size, seed=3)
    loader = DataLoader(Dataset(data), batch_size=batch_size, sampler=sampler, shuffle=False)
    orders = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches = [b["index"].tolist() for b in loader]
        assert sum(len(b) for b in batches) == len(data)  # epoch length unchanged
        for b in batches:
            assert sum(flags[i] for i in b) >= math.ceil(len(b) / 3), b
        orders.append([i for b in batches for i in b])
        # the same epoch again gives the same order (exact resume)
        sampler.set_epoch(epoch)
        assert [i for b in loader for i in b["index"].tolist()] == orders[-1]
    assert orders[0] != orders[1]
    fg_share = np.mean([flags[i] for i in orders[0]])
    assert fg_share >= 1 / 3 > np.mean(flags)


def test_ranks_take_disjoint_shares_and_errors_are_named():
    data = _datalist(20, foreground_every=1)
    flags = foreground_flags(data)
    shares = [list(ForegroundOversampler(Dataset(data), flags, 4, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 10
    # with every item foreground no batch needs a replacement: the shares partition the data set
    assert sorted(shares[0] + shares[1]) == list(range(20))
    with pytest.raises(ValueError, match="no training item has foreground"):
        ForegroundOversampler(Dataset(data[:1]), [False], 4)
    with pytest.raises(ValueError, match="3 flags for a data set of 20"):
        ForegroundOversampler(Dataset(data), [True] * 3, 4)
    with pytest.raises(ValueError, match="fraction"):
        ForegroundOversampler(Dataset(data), flags, 4, fraction=0.0)
    with pytest.raises(KeyError, match="item 1 has no 'label'"):
        foreground_flags([data[0], {"image": torch.zeros(1)}])
