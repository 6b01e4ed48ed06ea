"""Training losses (SPEC section 4): noise-prediction MSE and Direct Consistency Optimization.

Pure tensor functions, computed in float32 whatever the model dtype.

DCO (Lee et al. 2024, arXiv 2402.12004), with the same x_t, noise and timestep for both terms:

    L_ft  = ||target - e_ft(x_t, c*)||^2      adapters on, token caption
    L_ref = ||target - e_pre(x_t, c)||^2      adapters off, no grad, base caption
    L_DCO = -log sigmoid(-beta * (L_ft - L_ref))
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

#: DCO's default beta (SPEC section 4); the default of the ``dco.beta`` config key.
DCO_BETA = 1000.0


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in float32: shape [batch]."""
    error = (prediction.float() - target.float()).pow(2)
    return error.flatten(1).mean(dim=1)


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE averaged over every element (the DreamBooth loss)."""
    return F.mse_loss(prediction.float(), target.float())


def dco_loss(
    prediction: torch.Tensor,
    reference_prediction: torch.Tensor,
    target: torch.Tensor,
    beta: float = DCO_BETA,
    average: Literal["batch", "sample"] = "batch",
) -> torch.Tensor:
    """The DCO loss. ``average="batch"``: each MSE over the whole batch, one sigmoid (reference code);
    ``"sample"``: one sigmoid term per sample, then the mean over the batch."""
    if average not in ("batch", "sample"):
        raise ValueError(f"unknown DCO averaging {average!r}; choose 'batch' or 'sample'")
    loss_ft = per_sample_mse(prediction, target)
    loss_ref = per_sample_mse(reference_prediction.detach(), target)
    if average == "batch":
        loss_ft, loss_ref = loss_ft.mean(), loss_ref.mean()
    return -F.logsigmoid(-beta * (loss_ft - loss_ref)).mean()


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, the velocity (v-prediction) or the clean sample."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"the scheduler's prediction_type {kind!r} is not supported; use epsilon, v_prediction or sample")
