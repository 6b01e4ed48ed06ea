"""The denoising loop: one function over a diffusers scheduler, shared by every sampler of the project.

k-diffusion's shape: a plain function of a model function, the latents, the scheduler, a rule
that combines the model's output into the one prediction the scheduler steps with, and callbacks::

    x = denoise(model, x, scheduler, combine, generators=generators, callbacks=[check, trace])

``model(x_in, t)`` returns whatever ``combine(output, i, steps)`` reads (for the sampler: the
UNet rows of every prediction each image needs); ``combine`` may depend on the step through
``i`` and ``steps`` (``progress = i / max(steps - 1, 1)``). Each callback gets a :class:`Step`
after the scheduler update: tracing and the non-finite check (:class:`NonFiniteCheck`) are
callbacks, so the loop itself never synchronises with the device.

Also here: the schedulers a sampler may pick (:func:`make_scheduler`), the DDIM update with the
noise of the clipped x0 (:func:`clipped_step_kwargs`) and per-image initial noise
(:func:`initial_noise`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

#: Scheduler names accepted by ``make_scheduler`` (and ``SampleSettings.scheduler`` / ``--scheduler``).
SCHEDULERS: tuple[str, ...] = ("default", "euler", "euler-a", "ddim", "dpm++", "ddpm")

#: ``NonFiniteCheck`` reads its device-side flag back this often (steps) unless told otherwise.
NONFINITE_CHECK_EVERY = 10


@dataclass(frozen=True)
class Step:
    """What a callback sees after step ``i`` (from 0) of ``steps``."""

    i: int
    steps: int
    t: torch.Tensor
    #: The scheduler's sigma at this step (sigma-based schedulers: Euler, DPM++), else None.
    sigma: torch.Tensor | None
    #: The sample after the update.
    x: torch.Tensor
    #: What the model function returned, and what ``combine`` made of it.
    output: Any
    guided: torch.Tensor


def denoise(
    model: Callable[[torch.Tensor, torch.Tensor], Any],
    x: torch.Tensor,
    scheduler,
    combine: Callable[[Any, int, int], torch.Tensor],
    *,
    timesteps: Sequence | None = None,
    generators: Sequence[torch.Generator] | None = None,
    step_kwargs: dict | None = None,
    callbacks: Sequence[Callable[[Step], None]] = (),
) -> torch.Tensor:
    """Run ``scheduler`` from ``x`` over ``timesteps`` (default: all of ``scheduler.timesteps``).

    ``x`` keeps its dtype between steps; the scheduler steps in float32. ``generators`` (one per
    image) draw the noise a stochastic scheduler adds; ``step_kwargs`` go to ``scheduler.step``
    (e.g. :func:`clipped_step_kwargs`). Returns the final sample.
    """
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    steps = len(timesteps)
    kwargs = dict(step_kwargs or {})
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = list(generators)
    for i, t in enumerate(timesteps):
        output = model(scheduler.scale_model_input(x, t), t)
        guided = combine(output, i, steps)
        sigmas = getattr(scheduler, "sigmas", None)
        sigma = None if sigmas is None else sigmas[i]
        x = scheduler.step(guided, t, x.float(), return_dict=False, **kwargs)[0].to(x.dtype)
        if callbacks:
            step = Step(i, steps, t, sigma, x, output, guided)
            for callback in callbacks:
                callback(step)
    return x


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Float32 noise of ``(len(seeds), *shape)`` on the CPU, and the generators that drew it.

    One ``torch.Generator`` per image, seeded with its seed: an image's noise does not depend on
    the device or on the other images of its batch; keep the generators for a stochastic scheduler.
    """
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


# ---------------------------------------------------------------------------------------------
# Schedulers


def make_scheduler(model_scheduler, name: str = "default"):
    """A fresh scheduler: the model's own (``default``) or one of ``SCHEDULERS`` built from its config."""
    import diffusers

    config = model_scheduler.config
    if name == "default":
        return model_scheduler.__class__.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "euler-a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddpm":
        return diffusers.DDPMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def clipped_step_kwargs(scheduler) -> dict:
    """``{"use_clipped_model_output": True}`` for a scheduler that clips (or thresholds) its x0 estimate
    and can recompute the noise from the clipped x0 (DDIM); ``{}`` otherwise.

    DDIM by default clips x0 but keeps the *unclipped* predicted noise for the direction to x_{t-1}.
    With guidance the two disagree more the larger w_text is, and pixel-space samples turn into
    saturated noise; recomputing the noise from the clipped x0 keeps the update consistent (what
    it changes in the miniature world: docs/SAMPLING.md). Latent-model schedulers do not clip, so
    nothing changes for them.
    """
    config = scheduler.config
    clips = bool(config.get("clip_sample", False) or config.get("thresholding", False))
    if clips and "use_clipped_model_output" in inspect.signature(scheduler.step).parameters:
        return {"use_clipped_model_output": True}
    return {}


# ---------------------------------------------------------------------------------------------
# The non-finite check


class NonFiniteError(FloatingPointError, ValueError):
    """A guided prediction became NaN or infinite (the step and the image are in the message)."""


class NonFiniteCheck:
    """Callback: raise :class:`NonFiniteError` naming the first step at which an image became NaN or inf.

    Each step flags, on the device, the images whose sample (and, with ``row_images``, whose rows
    of the model output: ``row_images[r]`` is the image of row ``r``) is not finite; the flag is read
    back (a host sync) every ``every`` steps and at the last one. ``labels`` name the images in
    the message, e.g. ``"mode 'pr' for seed 3"``.
    """

    def __init__(self, labels: Sequence[str], every: int | None = None, row_images: Sequence[int] | None = None,
                 dtype: torch.dtype | None = None):
        self.labels = list(labels)
        #: The model's dtype: the advice to sample in float32 is given only when it is not float32 already.
        self.dtype = dtype
        self.every = NONFINITE_CHECK_EVERY if every is None else every
        self.row_images = None if row_images is None else list(row_images)
        self._first_bad: torch.Tensor | None = None
        self._row_member: torch.Tensor | None = None
        self._timesteps: list = []

    def __call__(self, step: Step) -> None:
        x = step.x
        if self._first_bad is None:
            self._first_bad = torch.full((len(self.labels),), -1, dtype=torch.long, device=x.device)
        bad = ~torch.isfinite(x).flatten(1).all(dim=1)
        if self.row_images is not None:
            if self._row_member is None:  # rows x images, built once: no host-to-device copy per step
                member = torch.zeros(len(self.row_images), len(self.labels), dtype=torch.bool)
                member[torch.arange(len(self.row_images)), torch.tensor(self.row_images)] = True
                self._row_member = member.to(x.device)
            # The prediction channels (a learned variance, if any, comes after them).
            rows = step.output[:, : x.shape[1]]
            bad_rows = ~torch.isfinite(rows).flatten(1).all(dim=1)
            bad = bad | (bad_rows[:, None] & self._row_member).any(dim=0)
        first_bad = self._first_bad
        self._first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step.i), first_bad)
        self._timesteps.append(step.t)
        if (step.i + 1) % self.every == 0 or step.i + 1 == step.steps:
            self.raise_if_nonfinite(step.steps)

    def raise_if_nonfinite(self, steps: int) -> None:
        if self._first_bad is None:
            return
        for label, step in zip(self.labels, self._first_bad.tolist()):  # the host sync
            if step >= 0:
                raise NonFiniteError(
                    f"the sample became non-finite (NaN or inf) at step {step + 1}/{steps} "
                    f"(timestep {float(self._timesteps[step]):g}) in {label}; "
                    + ("lower the guidance weights, or check the adapter and model weights for NaN"
                       if self.dtype == torch.float32 else
                       "sample in float32 (--dtype float32) or lower the guidance weights")
                )
