"""masks.place, unsqueeze and permute against the same moves of boolean tensors: a mask is a set of
elements, so moving it must give the set that moving a tensor of its elements gives."""

from __future__ import annotations

import pytest
import torch

from gammaguide import masks
from gammaguide.masks import ALL, Part, part
from gammaguide.verify import _mask_tensor


def elements(mask, shape: tuple[int, ...]) -> torch.Tensor:
    """The mask as a boolean tensor of ``shape`` (verify's reading of a part, which it checks with)."""
    if mask is None:
        return torch.zeros(shape, dtype=torch.bool)
    if mask is ALL:
        return torch.ones(shape, dtype=torch.bool)
    return _mask_tensor(mask, torch.Size(shape))


CHANNELS = part((-3,), (4,), 0b0101)  # channels 0 and 2 of a (B, C, H, W) tensor
ROWS = part((-2,), (3,), 0b011)
CHECKER = part((-2, -1), (3, 2), 0b100110)


@pytest.mark.parametrize("mask", [CHANNELS, ROWS, CHECKER, ALL, None])
@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
def test_place_gives_the_elements_a_concatenation_gives(mask, dim):
    shape = (2, 4, 3, 2)
    other = tuple(5 if d == dim % 4 else s for d, s in enumerate(shape))
    mine = elements(mask, shape)
    for first in (True, False):  # the masked piece first or second
        pieces = [mine, torch.zeros(other, dtype=torch.bool)]
        out = torch.cat(pieces if first else pieces[::-1], dim)
        offset = 0 if first else other[dim % 4]
        got = masks.place(mask, tuple(out.shape), dim, offset, shape[dim % 4])
        assert torch.equal(elements(got, tuple(out.shape)), out), (mask, dim, first, got)


@pytest.mark.parametrize("mask", [CHANNELS, ROWS, CHECKER, ALL])
@pytest.mark.parametrize("dim", [0, 1, 2, 3, 4, -1])
def test_unsqueeze_then_place_gives_the_elements_a_stack_gives(mask, dim):
    shape = (2, 4, 3, 2)
    out = torch.stack([torch.zeros(shape, dtype=torch.bool), elements(mask, shape)], dim)
    got = masks.place(masks.unsqueeze(mask, 5, dim), tuple(out.shape), dim, 1, 1)
    assert torch.equal(elements(got, tuple(out.shape)), out), (mask, dim, got)


@pytest.mark.parametrize("mask", [CHANNELS, ROWS, CHECKER, part((-4, -3), (2, 4), 0b00100101)])
@pytest.mark.parametrize("perm", [(0, 2, 3, 1), (0, 3, 1, 2), (1, 0, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (0, 1, 2, 3)])
def test_permute_gives_the_elements_a_permutation_gives(mask, perm):
    """Dimensions that part ways (channels moved last past height and width) widen the part over
    the dimensions between them instead of taking every element."""
    shape = (2, 4, 3, 2)
    got = masks.permute(mask, shape, list(perm))
    out = elements(mask, shape).permute(perm)
    assert torch.equal(elements(got, tuple(out.shape)), out), (mask, perm, got)


def test_a_permutation_that_would_widen_a_part_past_the_limit_takes_every_element(monkeypatch):
    monkeypatch.setattr(masks, "_WIDEST", 8)
    masks._permute.cache_clear()
    try:
        batch_and_channels = part((-4, -3), (2, 4), 0b00100101)
        assert masks.permute(batch_and_channels, (2, 4, 3, 2), [0, 2, 3, 1]) is ALL  # widened: 48 bits > 8
        assert isinstance(masks.permute(batch_and_channels, (2, 4, 3, 2), [1, 0, 2, 3]), Part)  # not widened
    finally:
        masks._permute.cache_clear()
