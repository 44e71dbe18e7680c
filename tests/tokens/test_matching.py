"""Index tensors of merging / pooling / pruning: exact counts, shapes, odd grids, representatives."""

import pytest
import torch

from accel.tokens import matching


@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 5, 7), (3, 5, 7), (1, 1, 9)])
@pytest.mark.parametrize("shared", [True, False])
def test_bipartite_removes_exactly_r_and_restores_shape(grid, shared):
    n = grid[0] * grid[1] * grid[2]
    win = matching.Windows(grid, (2, 2, 2), "cpu")
    x = torch.randn(3, n, 16)
    n_src = n - int(win.destinations(None).sum())
    for ratio in (0.1, 0.3, 0.5, 0.9):
        r = int(n * ratio)
        m = matching.bipartite(x, win, r, shared, torch.Generator().manual_seed(0))
        assert m.removed == min(r, n_src)
        merged = m.merge(x)
        assert merged.shape == (3, n - m.removed, 16)
        assert m.unmerge(merged).shape == x.shape
        # each row is represented by one of its own tokens, and rows are in raster order
        assert torch.equal(m.slot.gather(1, m.keep), torch.arange(m.n_out).expand_as(m.keep))
        assert bool((m.keep.diff(dim=1) > 0).all())


def test_unmerged_tokens_pass_through_and_merged_are_means():
    win = matching.Windows((1, 6, 6), (1, 2, 2), "cpu")
    x = torch.randn(2, 36, 8, dtype=torch.float64)
    m = matching.bipartite(x, win, 10, False, None)
    back = m.unmerge(m.merge(x))
    for b in range(2):
        counts = torch.bincount(m.slot[b], minlength=m.n_out)
        alone = counts[m.slot[b]] == 1
        assert torch.equal(back[b][alone], x[b][alone])
        row = int(m.slot[b][~alone][0])
        members = (m.slot[b] == row).nonzero()[:, 0]
        torch.testing.assert_close(back[b, members[0]], x[b, members].mean(0))


def test_fixed_destinations_are_window_origins_and_random_ones_stay_inside():
    win = matching.Windows((1, 5, 5), (1, 2, 2), "cpu")
    fixed = win.destinations(None).reshape(5, 5)
    assert fixed[::2, ::2].all() and int(fixed.sum()) == 9
    rand = win.destinations(torch.Generator().manual_seed(3))
    assert int(rand.sum()) == 9  # one per window, edge windows included
    assert torch.equal(torch.bincount(win.window_id[rand], minlength=9), torch.ones(9, dtype=torch.long))


def test_similar_tokens_merge_first():
    win = matching.Windows((1, 4, 4), (1, 2, 2), "cpu")
    x = torch.randn(1, 16, 32)
    dst = win.destinations(None).nonzero()[:, 0]
    src = (~win.destinations(None)).nonzero()[:, 0]
    x[0, src[0]] = x[0, dst[2]] * 3.0  # same direction: cosine similarity 1
    m = matching.bipartite(x, win, 1, False, None)
    assert int(m.slot[0, src[0]]) == int(m.slot[0, dst[2]])


def test_window_pool_removes_at_most_r_uniform_windows_first():
    win = matching.Windows((2, 4, 4), (2, 2, 2), "cpu")
    x = torch.randn(2, 32, 8)
    x[:, win.window_id == 1] = 1.0  # one perfectly uniform window
    m = matching.window_pool(x, win, 7)
    assert m.removed == 7 and m.shared
    assert len(set(m.slot[0, win.window_id == 1].tolist())) == 1
    assert matching.window_pool(x, win, 100).removed == 28  # 4 windows of 8 -> 4 rows


def test_top_changed_picks_the_changed_tokens():
    prev = torch.randn(2, 20, 4)
    x = prev.clone()
    x[:, [3, 11, 17]] += 5.0
    assert matching.top_changed(x, prev, 3).tolist() == [3, 11, 17]
