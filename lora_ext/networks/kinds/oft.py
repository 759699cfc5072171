"""OFT and BOFT (kohya's networks.oft, LyCORIS's diag-oft and boft): the layer's own weight turned by an
orthogonal matrix over its output channels, block-diagonal (OFT) or a butterfly of block-diagonal stages
(BOFT). `oft_blocks` [blocks, b, b] (BOFT: [stages, blocks, b, b]) hold Q, made skew-symmetric and turned into
R by the Cayley transform, Q's norm capped at alpha * out (alpha is the constraint here, not a scale);
LyCORIS's older `oft_diag` holds R itself. `rescale` [out, 1..] scales the result."""
from __future__ import annotations

import torch

from .base import BadModule, NetworkType


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 of Q = B - B^T, Q's norm first capped at `constraint` (0: no cap)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = q.norm()
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def turn_blocks(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """OFT: each block of b output rows becomes R_k^T times it."""
    k, b, _ = r.shape
    rows = weight.reshape(k, b, *weight.shape[1:])
    return torch.einsum("knm,kn...->km...", r, rows).reshape(weight.shape)


def butterfly(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """BOFT: stage i pairs output rows 2^i * b/2 apart (a butterfly permutation), turns each block of b by
    R_i, and puts the rows back."""
    stages, _, b, _ = r.shape
    rest = weight.shape[1:]
    x = weight
    for i in range(stages):
        k = 2 ** i * (b // 2)
        x = x.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, b, *rest)
        x = torch.einsum("dij,dj...->di...", r[i], x)
        x = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(weight.shape)
    return x


class OFT(NetworkType):
    name, title = "oft", "OFT"
    algos = ("oft", "diag-oft", "boft")
    parts = ("oft_blocks", "oft_diag", "rescale")
    main_part = "oft_blocks"
    needs_base = True
    layouts = ("boft",)

    def detect(self, parts):
        return "oft_blocks" in parts or "oft_diag" in parts

    def example(self, shape, noise, bias=None, layout=""):
        """Blocks of 4 (BOFT: 2 stages of them), on a layer with a multiple of 8 outputs."""
        out = shape[0]
        if out % 8:
            return None
        blocks = noise(2, out // 4, 4, 4) if layout == "boft" else noise(out // 4, 4, 4)
        return {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}

    def check(self, parts):
        blocks = parts.get("oft_blocks", parts.get("oft_diag"))
        square = blocks.ndim in (3, 4) and blocks.shape[-1] == blocks.shape[-2]
        if not square or ("oft_diag" in parts and blocks.ndim != 3):
            raise BadModule(f"its blocks {list(blocks.shape)} are not square blocks")
        if blocks.ndim == 4 and blocks.shape[-1] % 2:
            raise BadModule(f"BOFT blocks of odd size {blocks.shape[-1]}")

    def is_conv(self, parts):
        return False

    def fits(self, parts, shape):
        blocks = parts.get("oft_blocks", parts.get("oft_diag"))
        return blocks.shape[-3] * blocks.shape[-1] == shape[0]

    def delta_on(self, parts, scale, shape, base, alpha):
        if "oft_diag" in parts:     # R itself
            turned = turn_blocks(base, parts["oft_diag"])
        else:
            blocks = parts["oft_blocks"]
            r = cayley(blocks, (alpha or 0.0) * shape[0])
            turned = butterfly(base, r) if blocks.ndim == 4 else turn_blocks(base, r)
        if "rescale" in parts:
            turned = turned * parts["rescale"].reshape(-1, *[1] * (len(shape) - 1))
        return (turned - base) * scale
