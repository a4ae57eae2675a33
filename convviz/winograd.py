"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3) (Lavin & Gray, CVPR 2016).

A stride-1 3x3 convolution computes each 4x4 block of outputs from a 6x6 block of inputs. In
Winograd's transformed space that is 36 elementwise products per (input, output) channel pair
instead of 144 multiply-adds, so the work becomes 36 matrix products [tiles, Cin] x [Cin, Cout],
2.25-4x fewer multiply-adds than the direct convolution, plus two small linear transforms of the
input and output tiles (each one matrix product over all tiles). Exact in real arithmetic; in
float32 it differs from the direct convolution by about 1e-5 of the output's scale (the
transforms' coefficients reach 8 and 1/24). Used by the occlusion sweep's whole-map layers where
it measures faster (e.g. ResNet-50's 3x3 convolutions on its 4x4 and 8x8 maps at 64 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convviz.deconv_window import pair

# Lavin & Gray's F(4, 3) with interpolation points 0, +-1, +-2 and infinity.
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]
TILE, SPAN = 4, 6  # outputs per tile side, inputs per tile side


def applies(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution WinogradConv computes: a plain nn.Conv2d, 3x3, stride 1,
    no dilation or groups, zero padding given as numbers."""
    return (
        type(conv) is nn.Conv2d
        and pair(conv.kernel_size) == (3, 3)
        and pair(conv.stride) == (1, 1)
        and pair(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class WinogradConv(nn.Module):
    """conv(x) for a 3x3 stride-1 nn.Conv2d (see `applies`) by F(4x4, 3x3), for any input size.

    Output is channels-last. The filters are transformed once, here (in float64, then cast).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not applies(conv):
            raise ValueError(f"WinogradConv needs a 3x3 stride-1 Conv2d without dilation or groups, got {conv}")
        weight = conv.weight.detach()
        bt = torch.tensor(_BT, dtype=torch.float64, device=weight.device)
        at = torch.tensor(_AT, dtype=torch.float64, device=weight.device)
        cout, cin = weight.shape[:2]
        self.register_buffer("u", weight.new_empty(SPAN * SPAN, cin, cout))
        self.set_weight(weight)
        # vec(B^T d B) = kron(B^T, B^T) vec(d); vec(A^T m A) = kron(A^T, A^T) vec(m) (row-major vec).
        self.register_buffer("input_transform", torch.kron(bt, bt).to(weight.dtype))  # [36, 36]
        self.register_buffer("output_transform", torch.kron(at, at).to(weight.dtype))  # [16, 36]
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(cout)
        self.register_buffer("bias", bias)
        self.padding = pair(conv.padding)
        self.out_channels = cout
        self._bias_rows: dict[int, Tensor] = {}
        self._buffers_kept: dict[str, Tensor] = {}
        self._zeroed: tuple | None = None  # (shape, address, input size) the padded buffer was zeroed for

    def set_weight(self, weight: Tensor) -> None:
        """Transform new filters [Cout, Cin, 3, 3] (same shape) into U (in float64, then cast):
        U[xi, cin, cout] = (G w G^T)[xi] for each channel pair, xi over the 6x6 transformed positions."""
        g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
        u = torch.einsum("ik,ockl,jl->ijco", g, weight.detach().double(), g).reshape(self.u.shape)
        self.u.copy_(u)

    def release(self) -> None:
        """Free the buffers kept between calls (they are made again on the next call)."""
        self._buffers_kept.clear()
        self._bias_rows.clear()
        self._zeroed = None

    def _bias_row(self, tiles: int) -> Tensor:
        """The bias repeated over the tiles, (tile, cout) order: [tiles * Cout]."""
        row = self._bias_rows.get(tiles)
        if row is None or row.device != self.bias.device:
            row = self._bias_rows[tiles] = self.bias.repeat(tiles)
        return row

    def _scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of `shape` in the buffer kept under `name`, reused from call to call (fresh
        multi-megabyte tensors cost a page fault per 4 KiB on first touch); grown when needed."""
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers_kept.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers_kept[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        (ph, pw) = self.padding
        out_h, out_w = height + 2 * ph - 2, width + 2 * pw - 2
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {height}x{width} with padding {self.padding} is smaller than the 3x3 kernel")
        ty, tx = -(-out_h // TILE), -(-out_w // TILE)
        count = batch * ty * tx
        # Channels-last throughout: every copy moves runs of Cin (or Cout) contiguous values.
        # The input, zero-padded to whole tiles (the extra outputs at the bottom/right are cut off
        # at the end): only the interior is written, so the border stays zero from call to call.
        padded_shape = (batch, ty * TILE + 2, tx * TILE + 2, channels)
        padded = self._scratch("padded", padded_shape, x)
        # Zeroed again for a new buffer, a new shape in it, or a new interior (a smaller map in the
        # same tiles would leave the last call's values where its padding is).
        layout = (padded_shape, padded.data_ptr(), height, width)
        if self._zeroed != layout:
            padded.zero_()
            self._zeroed = layout
        padded[:, ph : ph + height, pw : pw + width].copy_(x.permute(0, 2, 3, 1))
        tiles = padded.unfold(1, SPAN, TILE).unfold(2, SPAN, TILE)  # [B, ty, tx, Cin, 6, 6]
        columns = self._scratch("a", (SPAN, SPAN, batch, ty, tx, channels), x)
        columns.copy_(tiles.permute(4, 5, 0, 1, 2, 3))
        v = self._scratch("b", (SPAN * SPAN, count * channels), x)
        torch.mm(self.input_transform, columns.view(SPAN * SPAN, -1), out=v)
        m = self._scratch("a", (SPAN * SPAN, count, self.out_channels), x)  # the columns are spent
        torch.bmm(v.view(SPAN * SPAN, count, channels), self.u, out=m)
        y = self._scratch("b", (TILE * TILE, count * self.out_channels), x)  # so is v
        torch.addmm(self._bias_row(count), self.output_transform, m.view(SPAN * SPAN, -1), out=y)
        # A new tensor (the caller may keep it), written tile by tile: [B, ty, 4, tx, 4, Cout].
        out = x.new_empty(batch, ty * TILE, tx * TILE, self.out_channels)
        out.view(batch, ty, TILE, tx, TILE, self.out_channels).copy_(
            y.view(TILE, TILE, batch, ty, tx, self.out_channels).permute(2, 3, 0, 4, 1, 5)
        )
        if (ty * TILE, tx * TILE) != (out_h, out_w):
            out = out[:, :out_h, :out_w]
        return out.permute(0, 3, 1, 2)  # channels-last [B, Cout, Hout, Wout]
