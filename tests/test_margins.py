import math

import pytest
import torch

from monai_amat.margins import MarginTable, margin_update, start_radius


def test_margin_update_by_hand():
    m = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5])
    expand = torch.tensor([True, False, False, False, True])
    refine = torch.tensor([False, True, False, False, False])
    est = torch.tensor([9.0, 1.25, 9.0, 9.0, 9.0])
    out = margin_update(m, expand, refine, est, delta=0.5, max_margin=4.2)
    assert out.tolist() == [1.5, 1.25, 3.0, 4.0, 1.0]
    out = margin_update(m, expand, refine, est, delta=0.5, max_margin=1.25, reset=torch.tensor([0, 0, 1, 0, 0]).bool())
    assert out.tolist() == [1.25, 1.25, 0.5, 1.25, 1.0]
    assert start_radius(torch.tensor([0.5, 1.0, 3.0]), 0.5).tolist() == [0.5, 0.5, 2.5]


def test_margin_table_epoch_by_hand():
    t = MarginTable(5, delta=1.0)
    t.margins = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t.begin_epoch()
    # sample 0: never found -> expand; 1: found -> running mean of estimates; 2: clean-wrong -> kept;
    # 3: seen twice in one batch (crops): found in one crop -> refine with the mean norm; 4: not seen -> kept
    t.record(
        torch.tensor([0, 1, 2, 3, 3]),
        clean_correct=torch.tensor([True, True, False, True, True]),
        found=torch.tensor([False, True, True, False, True]),
        noise_norm=torch.tensor([1.0, 1.0, 3.0, 2.0, 4.0]),
        boundary_norm=torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0]),
    )
    t.record(
        torch.tensor([1]),
        clean_correct=torch.tensor([True]),
        found=torch.tensor([False]),
        noise_norm=torch.tensor([2.5]),
        boundary_norm=torch.tensor([2.5]),
    )
    stats = t.end_epoch()
    # sample 1: estimate (2 + 1)/2 = 1.5, then (1.5 + 2.5)/2 = 2.0; found in the first batch -> refine to 2.0
    # sample 3: mean norm (2 + 4)/2 = 3, estimate (4 + 3)/2 = 3.5
    assert t.margins.tolist() == [2.0, 2.0, 3.0, 3.5, 5.0]
    assert stats["margin_expanded"] == pytest.approx(1 / 4) and stats["margin_refined"] == pytest.approx(2 / 4)
    assert stats["margin_max"] == 5.0


def test_first_wrong_estimate_and_reset_variant():
    t = MarginTable(2, delta=1.0, estimate="first_wrong", reset_clean_wrong=True)
    t.margins = torch.tensor([4.0, 4.0])
    t.begin_epoch()
    t.record(
        torch.tensor([0, 1]),
        torch.tensor([True, False]),
        torch.tensor([True, True]),
        torch.tensor([4.0, 4.0]),
        torch.tensor([1.0, 1.0]),
    )
    t.end_epoch()
    assert t.margins.tolist() == [2.5, 1.0]  # (4 + 1)/2; clean-wrong reset to delta


def test_margin_table_errors_and_state():
    with pytest.raises(ValueError, match="delta"):
        MarginTable(3, delta=0.0)
    with pytest.raises(ValueError, match="max_margin"):
        MarginTable(3, delta=1.0, max_margin=0.5)
    with pytest.raises(ValueError, match="estimate"):
        MarginTable(3, delta=1.0, estimate="median")
    t = MarginTable(3, delta=1.0, max_margin=math.inf)
    with pytest.raises(ValueError, match=r"sample index \[3\] outside the margin table of 3 samples"):
        t.lookup(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        t.lookup(torch.tensor([0.5]))
    t.record(torch.tensor([2]), torch.tensor([True]), torch.tensor([True]), torch.tensor([0.4]), torch.tensor([0.4]))
    u = MarginTable(3, delta=1.0)
    u.load_state_dict(t.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), u.state_dict().values()))
    with pytest.raises(ValueError, match="margins for 3 samples but this table has 4"):
        MarginTable(4, delta=1.0).load_state_dict(t.state_dict())
