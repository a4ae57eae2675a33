"""Stride-1 convolutions by Winograd's minimal filtering algorithm F(m x m, r x r) (Lavin & Gray,
CVPR 2016).

A stride-1 r x r convolution computes each m x m block of outputs from an n x n block of inputs,
n = m + r - 1. In Winograd's transformed space that is n*n elementwise products per (input,
output) channel pair instead of m*m*r*r multiply-adds, so the work becomes n*n matrix products
[tiles, Cin] x [Cin, Cout] plus two small linear transforms of the input and output tiles (each
applied along one axis, then the other). F(4x4, 3x3): 36 products instead of 144; F(3x3, 3x3): 25
instead of 81 (a 3x3 map in one tile); F(4x4, 5x5): 64 instead of 400. Exact in real arithmetic;
in float32 it differs from the direct convolution by about 1e-5 (n <= 6) to 1e-4 (n = 8) of the
output's scale, as the transforms' coefficients grow with n; tiles with n > 8 are not offered.
Used by the occlusion sweep's whole-map layers where it measures faster (ResNet-50's 3x3
convolutions on its 4x4 and 8x8 maps, AlexNet's conv2-conv5 at 64 px) and by the graph deconvnet.

The transforms come from the Cook-Toom construction with the interpolation points 0, 1, -1, 2,
-2, 1/2, -1/2 (as many as needed) and infinity: for the correlation y = A^T [(G g) . (B^T d)],
A^T = V_m^T, G = V_r and B^T = V_n^-T, where V_k is the n x k Vandermonde matrix of the points
(the point at infinity picks the leading coefficient), with row j of B^T scaled by
prod_{l != j} (p_j - p_l) and row j of G divided by it, which makes B^T integer for n <= 6
(F(4x4, 3x3) gives Lavin & Gray's matrices exactly).
"""

from __future__ import annotations

import functools
import threading
from fractions import Fraction

import torch
from torch import Tensor, nn

from convviz.deconv_window import pair

_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))
MAX_SPAN = len(_POINTS) + 1  # n = m + r - 1 <= 8: larger tiles lose too much precision in float32
CHUNK_TILES = 256  # tiles per pass (whole images; at least one)

# Working buffers shared by every WinogradConv of a thread (they run one after another): a few MB
# in all instead of a set per layer, kept warm in memory and cache. `zeroed` records the layout
# (shape, address, interior) the padded input buffer's border was last zeroed for.
_shared = threading.local()


def _pool() -> dict:
    if not hasattr(_shared, "buffers"):
        _shared.buffers, _shared.zeroed = {}, None
    return _shared.buffers


@functools.lru_cache(maxsize=None)
def transforms(tile: int, kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B^T [n, n], G [n, r], A^T [m, n]) in float64 for F(tile, kernel), n = tile + kernel - 1."""
    span = tile + kernel - 1
    if tile < 1 or kernel < 1 or span > MAX_SPAN or span < 2:
        raise ValueError(f"F({tile}, {kernel}) needs 2 <= tile + kernel - 1 <= {MAX_SPAN}")
    points = _POINTS[: span - 1]

    def vandermonde(columns: int) -> list[list[Fraction]]:
        rows = [[p**j for j in range(columns)] for p in points]
        return rows + [[Fraction(0)] * (columns - 1) + [Fraction(1)]]  # the point at infinity

    scale = []
    for j, p in enumerate(points):
        product = Fraction(1)
        for q in points[:j] + points[j + 1 :]:
            product *= p - q
        scale.append(product)
    scale.append(Fraction(1))
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
    scale_t = as_tensor([float(s) for s in scale])
    bt = torch.linalg.inv(as_tensor([[float(v) for v in row] for row in vandermonde(span)])).T * scale_t[:, None]
    g = as_tensor([[float(v) for v in row] for row in vandermonde(kernel)]) / scale_t[:, None]
    at = as_tensor([[float(v) for v in row] for row in vandermonde(tile)]).T
    return bt, g, at


def applies(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution WinogradConv computes: a plain nn.Conv2d with a square
    kernel of 2 to 7, stride 1, no dilation or groups, zero padding given as numbers."""
    kernel = pair(getattr(conv, "kernel_size", 0))
    return (
        type(conv) is nn.Conv2d
        and kernel[0] == kernel[1]
        and 2 <= kernel[0] <= MAX_SPAN - 1
        and pair(conv.stride) == (1, 1)
        and pair(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def output_size(kernel: int, padding: tuple[int, int], in_hw) -> tuple[int, int]:
    """(Hout, Wout) of a stride-1 kernel x kernel convolution with `padding` on an in_hw map."""
    (height, width), (ph, pw) = in_hw, padding
    out_h, out_w = height + 2 * ph - kernel + 1, width + 2 * pw - kernel + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input {height}x{width} with padding {tuple(padding)} is smaller than the {kernel}x{kernel} kernel")
    return out_h, out_w


def tiles_worth_trying(kernel: int, out_hw: tuple[int, int], count: int = 2) -> list[int]:
    """The `count` tile sides m that need the fewest transformed products (tiles * n * n) for an
    out_hw output of a kernel x kernel convolution; the smaller tile first among equals (its
    transforms are more precise)."""
    (height, width) = out_hw
    options = []
    for tile in range(2, MAX_SPAN - kernel + 2):
        tiles = -(-height // tile) * -(-width // tile)
        options.append((tiles * (tile + kernel - 1) ** 2, tile))
    return [tile for _, tile in sorted(options)[:count]]


class WinogradConv(nn.Module):
    """conv(x) for a stride-1 nn.Conv2d (see `applies`) by F(tile x tile, r x r), any input size.

    Output is channels-last. The filters are transformed once, here (in float64, then cast).
    tile: the output block side m (default: the largest with n <= 6, e.g. 4 for 3x3 kernels; 2
    for 6x6 and 7x7 kernels).
    """

    def __init__(self, conv: nn.Conv2d, tile: int | None = None) -> None:
        super().__init__()
        if not applies(conv):
            raise ValueError(
                f"WinogradConv needs a stride-1 Conv2d with a square kernel of 2 to {MAX_SPAN - 1}, "
                f"without dilation or groups, got {conv}"
            )
        weight = conv.weight.detach()
        self.kernel = pair(conv.kernel_size)[0]
        self.tile = tile if tile is not None else max(2, 7 - self.kernel)
        self.span = self.tile + self.kernel - 1
        bt, _, at = transforms(self.tile, self.kernel)
        cout, cin = weight.shape[:2]
        self.register_buffer("u", weight.new_empty(self.span * self.span, cin, cout))
        self.set_weight(weight)
        # Each transform is applied along one axis, then (batched over the first) the other.
        self.register_buffer("input_transform", bt.to(weight.device, weight.dtype))  # [n, n], on the conv's device
        self.register_buffer("output_transform", at.to(weight.device, weight.dtype))  # [m, n]
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(cout)
        self.register_buffer("bias", bias)
        self.padding = pair(conv.padding)
        self.out_channels = cout
        self._bias_rows: dict[int, Tensor] = {}

    def set_weight(self, weight: Tensor) -> None:
        """Transform new filters [Cout, Cin, r, r] (same shape) into U (in float64, then cast):
        U[xi, cin, cout] = (G w G^T)[xi] for each channel pair, xi over the n x n transformed positions."""
        g = transforms(self.tile, self.kernel)[1].to(weight.device)
        u = torch.einsum("ik,ockl,jl->ijco", g, weight.detach().double(), g).reshape(self.u.shape)
        self.u.copy_(u)

    def release(self) -> None:
        """Free the working buffers (shared by this thread's WinogradConvs; made again on the next call)."""
        _pool().clear()
        _shared.zeroed = None
        self._bias_rows.clear()

    def _bias_row(self, tiles: int) -> Tensor:
        """The bias repeated over the tiles, (tile, cout) order: [tiles * Cout]."""
        row = self._bias_rows.get(tiles)
        if row is None or row.device != self.bias.device:
            row = self._bias_rows[tiles] = self.bias.repeat(tiles)
        return row

    def _scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of `shape` in the shared buffer `name`, reused from call to call and layer to
        layer (fresh multi-megabyte tensors cost a page fault per 4 KiB on first touch); grown
        when needed."""
        numel = 1
        for size in shape:
            numel *= size
        pool, key = _pool(), (name, like.dtype, like.device)
        buffer = pool.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = pool[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)

    def _along_both_axes(self, matrix: Tensor, x: Tensor, first: str, second: str) -> Tensor:
        """matrix applied along x's first axis, then along its second: x [a, a, K] -> [k, k, K]
        for matrix [k, a], through the kept buffers `first` and `second` (the result is in `second`)."""
        rows, columns = matrix.shape
        rest = x.shape[-1]
        step = self._scratch(first, (rows, columns, rest), x)
        torch.mm(matrix, x.view(columns, -1), out=step.view(rows, -1))
        out = self._scratch(second, (rows, rows, rest), x)
        torch.bmm(matrix.expand(rows, rows, columns), step, out=out)  # out[i] = matrix @ step[i]
        return out

    def _output_size(self, x: Tensor) -> tuple[int, int]:
        return output_size(self.kernel, self.padding, x.shape[-2:])

    def tiled_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        """The shape of the buffer `forward(x, out=...)` writes: [B, Hout, Wout, Cout] rounded up
        to whole tiles."""
        m = self.tile
        out_h, out_w = self._output_size(x)
        return x.shape[0], -(-out_h // m) * m, -(-out_w // m) * m, self.out_channels

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The convolution of x [B, Cin, H, W]: channels-last [B, Cout, Hout, Wout], written into
        `out` (contiguous, shaped as `tiled_shape(x)`: a buffer the caller keeps, which saves a
        page fault per 4 KiB of a fresh output) or into a new tensor."""
        batch, channels, height, width = x.shape
        m, n = self.tile, self.span
        out_h, out_w = self._output_size(x)
        ty, tx = -(-out_h // m), -(-out_w // m)
        # Written tile by tile: [B, ty, m, tx, m, Cout].
        shape = (batch, ty * m, tx * m, self.out_channels)  # tiled_shape(x)
        if out is None:
            out = x.new_empty(shape)
        elif tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {shape} tensor, got {tuple(out.shape)}")
        # Images in chunks of at most CHUNK_TILES tiles: the transformed products of a chunk
        # (n*n values per tile and channel, 4x the output's size for F(4x4, 5x5)) stay in cache
        # between the product and the output transform (AlexNet's conv2 at 64 px: 15.5 -> 12.8 ms,
        # ResNet-50's layer2 3x3 convolutions 11.2 -> 8.7 ms).
        step = min(batch, max(1, CHUNK_TILES // (ty * tx)))
        # The input, zero-padded to whole tiles (the extra outputs at the bottom/right are cut off
        # at the end), one chunk at a time: only the interior is written, so the border stays zero
        # from chunk to chunk and call to call.
        (ph, pw) = self.padding
        padded_shape = (step, ty * m + n - m, tx * m + n - m, channels)
        padded = self._scratch("padded", padded_shape, x)
        # Zeroed again for a new buffer, a new shape in it, or a new interior (a smaller map in the
        # same tiles, or another layer's padding, would leave values where this call's padding is).
        layout = (padded_shape, padded.data_ptr(), height, width, ph, pw)
        if _shared.zeroed != layout:
            padded.zero_()
            _shared.zeroed = layout
        for start in range(0, batch, step):
            chunk = x[start : start + step]
            self._tiles(chunk, padded[: len(chunk)], out[start : start + step], ty, tx)
        if (ty * m, tx * m) != (out_h, out_w):
            out = out[:, :out_h, :out_w]
        return out.permute(0, 3, 1, 2)  # channels-last [B, Cout, Hout, Wout]

    def _tiles(self, x: Tensor, padded: Tensor, out: Tensor, ty: int, tx: int) -> None:
        """out [B, ty*m, tx*m, Cout] = the convolution of x [B, Cin, H, W], in ty x tx tiles;
        padded: [B, ty*m + n - m, tx*m + n - m, Cin], zero where x is not written."""
        batch, channels, height, width = x.shape
        (ph, pw), m, n = self.padding, self.tile, self.span
        count = batch * ty * tx
        # Channels-last throughout: every copy moves runs of Cin (or Cout) contiguous values.
        padded[:, ph : ph + height, pw : pw + width].copy_(x.permute(0, 2, 3, 1))
        tiles = padded.unfold(1, n, m).unfold(2, n, m)  # [B, ty, tx, Cin, n, n]
        columns = self._scratch("a", (n, n, batch, ty, tx, channels), x)
        columns.copy_(tiles.permute(4, 5, 0, 1, 2, 3))
        v = self._along_both_axes(self.input_transform, columns.view(n, n, -1), "b", "c")  # B^T d B
        products = self._scratch("a", (n * n, count, self.out_channels), x)  # the columns are spent
        torch.bmm(v.view(n * n, count, channels), self.u, out=products)
        y = self._along_both_axes(self.output_transform, products.view(n, n, -1), "b", "c")  # A^T M A
        y = y.view(m * m, count * self.out_channels).add_(self._bias_row(count))
        out.view(batch, ty, m, tx, m, self.out_channels).copy_(
            y.view(m, m, batch, ty, tx, self.out_channels).permute(2, 3, 0, 4, 1, 5)
        )
