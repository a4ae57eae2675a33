"""WinogradConv (F(4x4, 3x3)) computes the same convolution as nn.Conv2d, for any map size."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convviz.winograd import WinogradConv, applies


def reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution in float64: the oracle both float32 computations are compared with."""
    bias = conv.bias.double() if conv.bias is not None else None
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=conv.padding)


@pytest.mark.parametrize(
    "batch, cin, cout, hw, padding, bias",
    [
        (3, 5, 7, (4, 4), 1, True),  # one tile
        (2, 4, 6, (7, 9), 1, False),  # partial tiles at the bottom and right: cut off
        (2, 3, 3, (6, 5), 0, True),  # no padding: a 4x3 output
        (1, 3, 2, (8, 8), 2, True),  # padding 2: a 10x10 output, three tiles a side
        (2, 16, 16, (1, 1), 1, True),  # a single position: only the centre tap is inside
        (4, 32, 24, (8, 8), (1, 0), True),  # different padding per axis
    ],
)
def test_equals_the_direct_convolution(batch, cin, cout, hw, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=padding, bias=bias).eval()
    x = torch.randn(batch, cin, *hw)
    expected = reference(conv, x)
    fast = WinogradConv(conv)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            got = fast(x.contiguous(memory_format=layout))
            assert got.shape == expected.shape
            # float32 Winograd error, relative to the output's scale: ~1e-6 here, ~1e-5 at 256 channels.
            assert (got.double() - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_buffers_reused_across_sizes_keep_their_zero_border_and_never_alias_the_output():
    """The padded input buffer is kept between calls and only its interior written: a call on a
    larger map then a smaller one must not see the larger map's values in its padding; and the
    output of one call must survive the next call."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    fast = WinogradConv(conv)
    small, large = torch.randn(2, 8, 4, 4) * 10, torch.randn(2, 8, 8, 8) * 10
    with torch.no_grad():
        first = fast(small)
        kept = first.clone()
        fast(large)
        again = fast(small)
        fast(torch.randn(2, 8, 4, 4))
    assert torch.equal(first, kept)  # not overwritten by the later calls
    assert torch.equal(again, kept)
    assert (again.double() - reference(conv, small)).abs().max() <= 2e-5 * reference(conv, small).abs().max()


def test_a_smaller_map_in_the_same_tiles_sees_zero_padding():
    """6x6 then 5x5 inputs share the padded buffer's shape (two tiles a side): the 5x5 call must
    not read the 6x6 call's last row and column where its padding is."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1).eval()
    fast = WinogradConv(conv)
    with torch.no_grad():
        for size in (6, 5, 6, 7, 5):
            x = torch.randn(2, 4, size, size) * 10
            expected = reference(conv, x)
            assert (fast(x).double() - expected).abs().max() <= 2e-5 * expected.abs().max(), size


@pytest.mark.parametrize(
    "conv, ok",
    [
        (nn.Conv2d(4, 4, 3, padding=1), True),
        (nn.Conv2d(4, 4, 3), True),
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), False),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), False),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), False),
        (nn.Conv2d(4, 4, 5, padding=2), False),
        (nn.Conv2d(4, 4, 3, padding="same"), False),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), False),
    ],
)
def test_applies_only_to_plain_stride_1_3x3_convolutions(conv, ok):
    assert applies(conv) is ok
    if not ok:
        with pytest.raises(ValueError, match="WinogradConv needs"):
            WinogradConv(conv)
