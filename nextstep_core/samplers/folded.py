"""Any sampler's step as the fast path runs it, with classifier-free guidance folded in.

A sampler's `coefficients` give per evaluation i: x <- A_i x + B_i v + C_i z[i + 1], v the guided
velocity. Here the state is kept as the rows the flow head reads ([rows, D], each image's x once per
CFG row, rows = cfg_mult * images): nothing is repeated before the head or split after it per
step, and the guidance becomes a [rows, rows] mixing matrix M_i that holds B_i times each CFG row's
weight (`cfg_weights`) between the rows of one image. A step is then two kernels whatever the
number of CFG rows:

    x <- M_i @ v_rows + (A_i x + C_i z[i + 1])        (addcmul, then addmm)

Every row of one image gets the same update, so the rows stay copies of one image's x (up to the
rounding of the product). What depends on the token is made once per token: M_i for every step
(one product, the CFG scales being per token) and C_i z for every step (one multiply). The mixing
is a float32 matrix product, so it follows torch's float32 matmul precision like the head's own
products (TF32 where a host allows it on a GPU). Nothing branches on a tensor's value, and the
shapes are fixed per image: the step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from .guidance import cfg_weights


class FoldedSteps:
    """The per-image constants of the folded step for `rows` CFG rows of `cfg_mult` kinds."""

    def __init__(self, coefficients, cfg_mult: int, rows: int, draws: int, device):
        a, b, c = coefficients
        steps, images = b.shape[0], rows // cfg_mult
        self.cfg_mult, self.images = cfg_mult, images
        self.a = a  # 0-d tensors, None for A = 1
        self.noisy = [ci is not None for ci in c]
        late = [i for i, n in enumerate(self.noisy) if n and i + 1 >= draws]
        if late:
            raise ValueError(f"The sampler's coefficients add noise z[{late[0] + 1}] at evaluation {late[0]}, but "
                             f"it draws {draws} per token: draws_per_token must count the start noise and every "
                             "noisy step.")
        # pattern[j, r, col] = 1 where col is a row of CFG kind j of the image that row r holds
        same_image = torch.eye(images, dtype=torch.float32, device=device).repeat(cfg_mult, cfg_mult)
        kind = torch.arange(rows, device=device) // images
        pattern = same_image[None] * (kind[None] == torch.arange(cfg_mult, device=device)[:, None])[:, None]
        # [steps * rows * rows, cfg_mult]: one matrix-vector product with a token's CFG weights gives every M_i
        per_kind = b.to(torch.float32)[None, :, None, None] * pattern[:, None]
        self.mixing = per_kind.reshape(cfg_mult, -1).t().contiguous()
        self.mixing_shape = (steps, rows, rows)
        # C_i for draw i + 1, 1 for the start draw (which becomes the state as it is), 0 where none is read
        scale = [torch.ones((), dtype=torch.float32, device=device)]
        for i in range(draws - 1):
            ci = c[i] if i < steps else None
            scale.append(torch.zeros((), dtype=torch.float32, device=device) if ci is None else ci.to(torch.float32))
        self.noise_scale = torch.stack(scale)[:, None, None]

    def start(self, z: torch.Tensor, scale: torch.Tensor):
        """For one token from its draws z [draws, images, D] and float32 CFG scales [2]: the start state
        [rows, D], every step's mixing matrix, and every draw already scaled by its C_i (rows)."""
        zr = z.repeat(1, self.cfg_mult, 1) if self.cfg_mult > 1 else z
        noise = (zr * self.noise_scale).unbind(0)
        mix = torch.mv(self.mixing, cfg_weights(scale, self.cfg_mult))
        return noise[0], mix.view(self.mixing_shape).unbind(0), noise

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor, mix, noise) -> torch.Tensor:
        """Evaluation i's update of the state x [rows, D] from the CFG rows' velocities v [rows, D]."""
        a = self.a[i]
        if self.noisy[i]:
            base = torch.addcmul(noise[i + 1], x, a) if a is not None else x + noise[i + 1]
        else:
            base = x * a if a is not None else x
        return torch.addmm(base, mix[i], v)

    def token(self, x: torch.Tensor) -> torch.Tensor:
        """The images' x [images, D] from the state (the rows of the first CFG kind)."""
        return x[: self.images] if self.cfg_mult > 1 else x
