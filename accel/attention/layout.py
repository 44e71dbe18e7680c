"""Token order for block-sparse attention: video tokens regrouped into 3-D tiles, text kept apart.

A block of ``block`` tokens is one tile of the (frames, height, width) token grid, so that a
block's tokens are neighbours in space and time (Sliding Tile Attention's layout) and a
block-level mask means something spatial. Edge tiles of a grid that the tile does not divide
are padded with masked key slots; text tokens get blocks of their own after the video tiles.
Layouts depend only on shapes and are cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def choose_tile(grid: tuple[int, int, int], block: int) -> tuple[int, int, int]:
    """Split ``block`` (a power of two) over (F, H, W): double the dimension with the most tiles left."""
    tile = [1, 1, 1]
    for _ in range(int(math.log2(block))):
        ratios = [grid[d] / tile[d] for d in range(3)]
        # ties go to width, then height: rows of a frame are contiguous already
        d = max((2, 1, 0), key=lambda i: ratios[i])
        tile[d] *= 2
    return tuple(tile)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    grid: tuple[int, int, int]
    text_len: int
    text_first: bool
    block: int
    tile: tuple[int, int, int]
    tiles: tuple[int, int, int]  # tile grid
    n_video_blocks: int
    n_text_blocks: int
    gather: torch.Tensor  # [n_blocks*block] original token index per slot; pad slots -> n_tokens
    scatter: torch.Tensor  # [n_tokens] slot of each original token
    valid: torch.Tensor  # [n_blocks*block] bool: slot holds a real token
    coords: torch.Tensor  # [n_video_blocks, 3] tile coordinates (f, h, w)

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2] + self.text_len

    @property
    def n_blocks(self) -> int:
        return self.n_video_blocks + self.n_text_blocks

    @property
    def padded(self) -> int:
        return self.n_blocks * self.block

    @functools.cached_property
    def block_has_pad(self) -> torch.Tensor:
        return ~self.valid.view(self.n_blocks, self.block).all(1)

    @functools.cached_property
    def pad_slots(self) -> torch.Tensor:
        return torch.nonzero(~self.valid).flatten()

    @functools.cached_property
    def gather_clamped(self) -> torch.Tensor:  # pad slots read token 0, then zeroed
        return self.gather.clamp(max=self.n_tokens - 1)

    @functools.cached_property
    def block_count(self) -> torch.Tensor:
        return self.valid.view(self.n_blocks, self.block).sum(1)

    def to(self, device) -> "BlockLayout":
        return _on_device(self, torch.device(device))


@functools.lru_cache(maxsize=64)
def _on_device(layout: BlockLayout, device: torch.device) -> BlockLayout:
    if layout.gather.device == device:
        return layout
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in layout.__dict__.items()
             if k in BlockLayout.__dataclass_fields__}
    return BlockLayout(**moved)


@functools.lru_cache(maxsize=64)
def build_layout(grid: tuple[int, int, int], text_len: int, text_first: bool, block: int) -> BlockLayout:
    """The tiled order of ``text_len`` text tokens plus a ``grid`` of video tokens (row-major F, H, W)."""
    F_, H, W = grid
    tile = choose_tile(grid, block)
    tf, th, tw = tile
    tiles = (-(-F_ // tf), -(-H // th), -(-W // tw))
    nv = tiles[0] * tiles[1] * tiles[2]
    nt = -(-text_len // block)
    n_video = F_ * H * W
    n_tokens = n_video + text_len
    video_offset = text_len if text_first else 0
    f, h, w = torch.meshgrid(torch.arange(F_), torch.arange(H), torch.arange(W), indexing="ij")
    tile_id = ((f // tf) * tiles[1] + h // th) * tiles[2] + w // tw
    within = ((f % tf) * th + h % th) * tw + w % tw
    slot_video = (tile_id * block + within).reshape(-1)
    text_offset = 0 if text_first else n_video
    slot_text = nv * block + torch.arange(text_len)
    scatter = torch.empty(n_tokens, dtype=torch.long)
    scatter[video_offset:video_offset + n_video] = slot_video
    scatter[text_offset:text_offset + text_len] = slot_text
    padded = (nv + nt) * block
    gather = torch.full((padded,), n_tokens, dtype=torch.long)
    gather[scatter] = torch.arange(n_tokens)
    valid = gather < n_tokens
    cf, ch, cw = torch.meshgrid(torch.arange(tiles[0]), torch.arange(tiles[1]), torch.arange(tiles[2]), indexing="ij")
    coords = torch.stack([cf, ch, cw], -1).reshape(-1, 3)
    return BlockLayout(tuple(grid), text_len, text_first, block, tile, tiles, nv, nt, gather, scatter, valid, coords)


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """[B, H, N, D] in model order -> [B, H, n_blocks*block, D] in tiled order (pad slots zero)."""
    if layout.pad_slots.numel() == 0:
        return x.index_select(2, layout.gather)
    return x.index_select(2, layout.gather_clamped).index_fill_(2, layout.pad_slots, 0)


def from_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    return x.index_select(2, layout.scatter)
