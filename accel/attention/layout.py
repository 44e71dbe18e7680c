"""Token order for block-sparse attention: video tokens regrouped into 3-D tiles, text kept apart.

Video tokens are ordered tile by tile (a tile of ``block`` tokens of the (frames, height, width)
grid, Sliding Tile Attention's layout), so that a block's tokens are neighbours in space and time
and a block-level mask means something spatial. The ordered tokens are then cut into blocks of
``block`` consecutive tokens with no gaps: where the tile divides the grid a block is exactly one
tile; the smaller edge tiles of a grid the tile does not divide come after the whole tiles, and
share blocks with their neighbours. Only the last video block and the last text block carry pad
slots, always at their end.
Padding every edge tile instead would waste work: Wan2.1's 480p grid (21 x 30 x 52) takes 43,008
slots for 32,760 tokens in 4 x 4 x 8 tiles (1.72x the block pairs), against 32,768 here.
A block's position (`coords`) is the mean grid position of its tokens, in tile units.
Layouts depend only on shapes and are cached; `BlockLayout.to` keeps one copy per device.
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
    tiles: tuple[int, int, int]  # tile grid (edge tiles may be smaller)
    n_video_blocks: int
    n_text_blocks: int
    gather: torch.Tensor  # [n_blocks*block] original token index per slot; pad slots -> n_tokens
    scatter: torch.Tensor  # [n_tokens] slot of each original token
    valid: torch.Tensor  # [n_blocks*block] bool: slot holds a real token (pads only at a block's end)
    coords: torch.Tensor  # [n_video_blocks, 3] float64: mean (f, h, w) of the block's tokens, in tile units

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

    @functools.cached_property
    def slot_token_i32(self) -> torch.Tensor:  # token of each slot (pads: n_tokens), for kernels that gather
        return self.gather.to(torch.int32).contiguous()

    @functools.cached_property
    def block_count_i32(self) -> torch.Tensor:  # real tokens per block, for kernels (pads are at the end)
        return self.block_count.to(torch.int32).contiguous()

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
    n_video = F_ * H * W
    nv = -(-n_video // block)
    nt = -(-text_len // block)
    n_tokens = n_video + text_len
    video_offset = text_len if text_first else 0
    # Built on the host, once per shape (lru_cache); `BlockLayout.to` moves it once per device (cached too),
    # so no per-call path makes these tensors.
    f, h, w = torch.meshgrid(torch.arange(F_), torch.arange(H), torch.arange(W), indexing="ij")
    tile_id = ((f // tf) * tiles[1] + h // th) * tiles[2] + w // tw
    within = ((f % tf) * th + h % th) * tw + w % tw
    # whole tiles first, each exactly one block; then the smaller edge tiles, which share blocks
    edge = (f // tf >= F_ // tf) | (h // th >= H // th) | (w // tw >= W // tw)
    order = ((edge.long() * (tiles[0] * tiles[1] * tiles[2]) + tile_id) * block + within).reshape(-1).argsort()
    slot_video = torch.empty(n_video, dtype=torch.long)
    slot_video[order] = torch.arange(n_video)
    text_offset = 0 if text_first else n_video
    slot_text = nv * block + torch.arange(text_len)
    scatter = torch.empty(n_tokens, dtype=torch.long)
    scatter[video_offset:video_offset + n_video] = slot_video
    scatter[text_offset:text_offset + text_len] = slot_text
    padded = (nv + nt) * block
    gather = torch.full((padded,), n_tokens, dtype=torch.long)
    gather[scatter] = torch.arange(n_tokens)
    valid = gather < n_tokens
    pos = torch.stack([f, h, w], -1).reshape(-1, 3).to(torch.float64) / torch.tensor(tile, dtype=torch.float64)
    sums = torch.zeros(nv, 3, dtype=torch.float64).index_add_(0, slot_video // block, pos)
    counts = torch.bincount(slot_video // block, minlength=nv).to(torch.float64)
    coords = sums / counts[:, None]
    return BlockLayout(tuple(grid), text_len, text_first, block, tile, tiles, nv, nt, gather, scatter, valid, coords)


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """[B, H, N, D] in model order -> [B, H, n_blocks*block, D] in tiled order (pad slots zero)."""
    if layout.pad_slots.numel() == 0:
        return x.index_select(2, layout.gather)
    return x.index_select(2, layout.gather_clamped).index_fill_(2, layout.pad_slots, 0)


def from_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    return x.index_select(2, layout.scatter)
