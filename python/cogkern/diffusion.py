"""CogVideoX's training objective: v-prediction on a DDPM noise schedule.

The schedule is CogVideoX's (scaled-linear betas from 0.00085 to 0.012 over
1000 steps, rescaled to zero terminal SNR). The model predicts
v = sqrt(a) * noise - sqrt(1 - a) * x0 (a = alphas_cumprod[t]). CogVideoX's
fine-tuning loss — x0 recovered from v, squared error weighted by 1 / (1 - a) —
equals the plain mean squared error on v, which is what `v_loss` computes.
"""
from __future__ import annotations

import torch


class DDPMSchedule:
    def __init__(self, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> None:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Zero terminal SNR (Lin et al. 2023), as CogVideoX's scheduler config asks.
        sqrt_ac = alphas_cumprod.sqrt()
        first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
        sqrt_ac = (sqrt_ac - last) * first / (first - last)
        self.alphas_cumprod = (sqrt_ac**2).float()
        self.num_steps = num_steps

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (batch,), generator=generator)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """x_t and the v target, in x0's dtype (math in fp32)."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        x0f, nf = x0.float(), noise.float()
        xt = a.sqrt() * x0f + (1 - a).sqrt() * nf
        v = a.sqrt() * nf - (1 - a).sqrt() * x0f
        return xt.to(x0.dtype), v.to(x0.dtype)


def v_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 whatever the model's dtype."""
    return torch.mean((v_pred.float() - v_target.float()) ** 2)
