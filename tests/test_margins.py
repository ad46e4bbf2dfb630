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
    t = MarginTable(6, delta=1.0)
    t.margins = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    t.begin_epoch()
    # sample 0: survives -> expand; 1: found, then survives in another batch -> expand (any appearance survived);
    # 2: clean-wrong and survives -> kept; 3: two crops in one batch, one found, one survived -> expand;
    # 4: not seen -> kept; 5: found in both batches, clean-wrong in the second -> refine from the first appearance
    t.record(
        torch.tensor([0, 1, 2, 3, 3, 5]),
        clean_correct=torch.tensor([True, True, False, True, True, True]),
        found=torch.tensor([False, True, False, False, True, True]),
        noise_norm=torch.tensor([1.0, 1.0, 3.0, 2.0, 4.0, 2.0]),
        boundary_norm=torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 2.0]),
    )
    t.record(
        torch.tensor([1, 5]),
        clean_correct=torch.tensor([True, False]),
        found=torch.tensor([False, True]),
        noise_norm=torch.tensor([2.5, 0.1]),
        boundary_norm=torch.tensor([2.5, 0.1]),
    )
    assert t.boundary_estimate.tolist() == [1.0, 2.0, 3.0, 3.5, 5.0, 4.0]
    stats = t.end_epoch()
    # sample 1: estimate (2 + 1)/2 = 1.5, then (1.5 + 2.5)/2 = 2.0, but it survived once -> expand to 3
    # sample 5: only its clean-correct appearance counts: (6 + 2)/2 = 4
    assert t.margins.tolist() == [2.0, 3.0, 3.0, 5.0, 5.0, 4.0]
    assert stats["margin_expanded"] == pytest.approx(3 / 5) and stats["margin_refined"] == pytest.approx(1 / 5)
    assert stats["margin_max"] == 5.0


def test_no_refine_keeps_found_margins_and_floor_bounds_the_estimate():
    t = MarginTable(3, delta=1.0, refine=False)
    t.margins = torch.tensor([4.0, 4.0, 4.0])
    t.begin_epoch()
    yes = torch.tensor([True, True])
    t.record(torch.tensor([0, 1]), yes, torch.tensor([True, False]), torch.ones(2), torch.ones(2))
    stats = t.end_epoch()
    assert t.margins.tolist() == [4.0, 5.0, 4.0] and stats["margin_refined"] == 0.0
    t = MarginTable(2, delta=1.0, floor=1.0)
    t.margins = torch.tensor([1.5, 1.5])
    t.begin_epoch()
    for norm in (0.2, 0.2):  # (1.5 + 0.2)/2 = 0.85 -> 1.0, then (1.0 + 0.2)/2 = 0.6 -> 1.0
        yes, norm = torch.tensor([True]), torch.tensor([norm])
        t.record(torch.tensor([0]), yes, yes, norm, norm)
    t.end_epoch()
    assert t.margins.tolist() == [1.0, 1.5]
    with pytest.raises(ValueError, match="floor"):
        MarginTable(2, delta=1.0, max_margin=2.0, floor=3.0)


def authors_epoch(margins, batches, delta, refine, bottom):
    """The authors' epoch, written as their code does it (``run_AMAT_iteration`` + ``AMAT_update_margin``)."""
    flag1 = torch.zeros(len(margins))
    flag2 = torch.zeros(len(margins))
    e_new = margins.clone()
    for idx, advc, yp_e_y, norm in batches:
        flag1[idx[advc == 0]] = 1
        flag2[idx[yp_e_y]] = 1
        idx_n = torch.arange(0, len(idx))[yp_e_y]
        if idx_n.shape[0] > 0:
            e_new[idx[idx_n]] = torch.max((e_new[idx[idx_n]] + norm[idx_n]) / 2, torch.full((len(idx_n),), bottom))
    e = margins.clone()
    expand = (flag1 == 1) & (flag2 == 1)
    no_expand = (flag1 == 0) & (flag2 == 1)
    e[expand] += delta
    if refine:
        e[no_expand] = e_new[no_expand]
    return e.clamp_(min=0, max=math.inf)


@pytest.mark.parametrize("refine, floor", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_margin_table_equals_the_authors_update(refine, floor):
    # 40 samples, 6 epochs of 12 batches of 8 drawn with replacement (distinct within a batch, as the authors'
    # fancy-index assignment would otherwise keep an arbitrary duplicate), some clean-wrong appearances
    g = torch.Generator().manual_seed(7)
    n, delta = 40, 0.5
    table = MarginTable(n, delta=delta, refine=refine, floor=floor)
    reference = torch.full((n,), delta)
    for _ in range(6):
        table.begin_epoch()
        batches = []
        for _ in range(12):
            idx = torch.randperm(n, generator=g)[:8]
            margin = reference[idx]
            found = torch.rand(8, generator=g) < 0.4
            correct = torch.rand(8, generator=g) < 0.8
            norm = margin * torch.rand(8, generator=g).sqrt()
            batches.append((idx, found.long(), correct, norm))
            table.record(idx, correct, found, norm, norm)
        table.end_epoch()
        reference = authors_epoch(reference, batches, delta, refine, floor)
        torch.testing.assert_close(table.margins, reference)
    assert not torch.all(reference == reference[0])  # the margins moved apart


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
    partial = {"margins": t.margins, "estimate": t.boundary_estimate, "seen": t.seen}
    fresh = MarginTable(3, delta=2.0)
    with pytest.raises(KeyError, match="margin state is missing"):
        fresh.load_state_dict(partial)
    assert fresh.margins.tolist() == [2.0, 2.0, 2.0]  # nothing half-loaded
