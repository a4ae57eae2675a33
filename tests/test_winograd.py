"""WinogradConv (F(m x m, r x r)) computes the same convolution as nn.Conv2d, for any map size."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convviz.winograd import MAX_SPAN, WinogradConv, applies, tiles_worth_trying, transforms


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


@pytest.mark.parametrize(
    "kernel, tile",
    [(3, m) for m in range(2, 7)] + [(5, m) for m in range(2, 5)] + [(2, 5), (7, 2)],
)
@pytest.mark.parametrize("hw, padding", [((3, 3), None), ((7, 9), 0), ((11, 9), (1, 0))])
def test_every_tile_and_kernel_equals_the_direct_convolution(kernel, tile, hw, padding):
    """F(m, r) for every tile side offered (n = m + r - 1 <= 8), on maps of one tile, partial
    tiles and unequal padding ('None': the padding that keeps the map size)."""
    torch.manual_seed(0)
    padding = kernel // 2 if padding is None else padding
    conv = nn.Conv2d(24, 40, kernel, padding=padding).eval()
    x = torch.randn(3, 24, *hw)
    expected = reference(conv, x)
    with torch.no_grad():
        got = WinogradConv(conv, tile)(x)
    assert got.shape == expected.shape
    # The transforms' coefficients grow with n: ~1e-6 of the output's scale at n = 4, ~1e-5 at n = 8.
    assert (got.double() - expected).abs().max() <= (2e-5 if tile + kernel <= 7 else 5e-5) * expected.abs().max()


def test_transforms_are_lavin_and_grays_for_f4x3():
    """The Cook-Toom construction reproduces the published F(4, 3) matrices (Lavin & Gray 2016, Eq. 10)."""
    bt, g, at = transforms(4, 3)
    lavin_bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    lavin_g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    lavin_at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    for got, expected in ((bt, lavin_bt), (g, lavin_g), (at, lavin_at)):
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_tile_sides_worth_trying_need_the_fewest_products():
    assert tiles_worth_trying(3, (3, 3)) == [3, 4]  # one 5x5 tile (25 products) before one 6x6 (36)
    assert tiles_worth_trying(3, (8, 8)) == [4, 5]  # four 6x6 tiles (144) before four 7x7 (196)
    assert tiles_worth_trying(5, (7, 7)) == [4, 3]  # four 8x8 tiles (256) before nine 7x7 (441)
    assert all(m + 5 - 1 <= MAX_SPAN for m in tiles_worth_trying(5, (30, 30), count=10))
    with pytest.raises(ValueError, match="F\\(7, 3\\)"):
        transforms(7, 3)  # n = 9: not offered


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
        (nn.Conv2d(4, 4, 5, padding=2), True),
        (nn.Conv2d(4, 4, 9, padding=4), False),  # n = m + 9 - 1 > 8 for every tile
        (nn.Conv2d(4, 4, (3, 5), padding=1), False),
        (nn.Conv2d(4, 4, 3, padding="same"), False),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), False),
    ],
)
def test_applies_only_to_plain_stride_1_square_convolutions(conv, ok):
    assert applies(conv) is ok
    if not ok:
        with pytest.raises(ValueError, match="WinogradConv needs"):
            WinogradConv(conv)


def test_writes_into_a_kept_buffer_of_whole_tiles():
    """forward(x, out=buffer): the same convolution, in the caller's [B, tiles*m, tiles*m, Cout]
    buffer (the output cut from it), and a buffer of the wrong shape is refused by name."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 5, padding=2).eval()
    fast = WinogradConv(conv, 3)
    x = torch.randn(2, 6, 7, 7)
    assert fast.tiled_shape(x) == (2, 9, 9, 10)  # 7x7 outputs in 3x3 tiles
    buffer = torch.full(fast.tiled_shape(x), float("nan"))
    with torch.no_grad():
        got = fast(x, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and got.shape == (2, 10, 7, 7)
    assert (got.double() - reference(conv, x)).abs().max() <= 2e-5 * reference(conv, x).abs().max()
    with pytest.raises(ValueError, match="out must be a contiguous"):
        fast(x, out=torch.empty(2, 7, 7, 10))


def test_layers_sharing_the_working_buffers_see_their_own_zero_padding():
    """Every WinogradConv of a thread shares one padded input buffer: a layer without padding
    writes values where a padded layer's border is (same buffer shape, 6x6 outputs in two 4x4
    tiles a side), so the padded layer's next call must zero it again."""
    torch.manual_seed(0)
    padded_conv, valid_conv = nn.Conv2d(4, 4, 3, padding=1).eval(), nn.Conv2d(4, 4, 3).eval()
    fast = {padded_conv: WinogradConv(padded_conv), valid_conv: WinogradConv(valid_conv)}
    with torch.no_grad():
        for conv, size in ((padded_conv, 6), (valid_conv, 8), (padded_conv, 6), (valid_conv, 8)):
            x = torch.randn(2, 4, size, size) * 10
            expected = reference(conv, x)
            assert expected.shape[-2:] == (6, 6)
            assert (fast[conv](x).double() - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("kernel, tile", [(2, 5), (3, 4), (5, 2), (6, 2), (7, 2)])
def test_default_tile_is_the_largest_with_at_most_six_points_per_side(kernel, tile):
    assert WinogradConv(nn.Conv2d(2, 2, kernel)).tile == tile
