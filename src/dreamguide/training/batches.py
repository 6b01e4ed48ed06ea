"""Micro-batches: the images a step trains on, their x_0, noise, timesteps, x_t, target and captions.

Everything random in a micro-batch comes from a generator seeded by (seed, step, micro-batch,
process), and the order of the images from a seeded permutation per epoch, so step s draws the
same batch whether the run started at step 0 or resumed from a checkpoint.

    x_0      latents of the images (cached VAE posterior, or encoded at every step), or the pixels
             themselves for a pixel-space model
    x_t      = scheduler.add_noise(x_0, eps, t); target = eps (or the velocity for v-prediction)
    cond     the token captions (class images: their base captions), encoded once where they
             cannot change and at every step where the token trains through the text encoders
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from dreamguide.models import TextConditioning, encode_prompts
from dreamguide.training.data import TrainImage
from dreamguide.training.losses import prediction_target


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from the integers ``parts`` (hashed together: no two tuples collide)."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def sample_indices(n_items: int, counter: int, count: int, seed: int, stream: int) -> list[int]:
    """Items for global sample positions ``counter .. counter+count-1``: each epoch is a seeded permutation."""
    indices = []
    for position in range(counter, counter + count):
        epoch, offset = divmod(position, n_items)
        order = torch.randperm(n_items, generator=seeded_generator(seed, stream, epoch))
        indices.append(int(order[offset]))
    return indices


class CaptionConditioning:
    """What the UNet is conditioned on for the captions of ``images``: encoded once when they
    cannot change, encoded at every call when ``live_token_captions`` (the token trains)."""

    def __init__(self, model, images: list[TrainImage], resolution: int, live_token_captions: bool):
        self.model = model
        self.images = images
        self.resolution = resolution
        self.cache: dict[str, TextConditioning] = {}
        captions = {img.base_caption for img in images}
        if not live_token_captions:
            captions |= {img.token_caption for img in images}
        with torch.no_grad():
            for caption in sorted(captions):
                self.cache[caption] = encode_prompts(model, [caption])

    def of_images(self, indices: list[int], caption: str) -> TextConditioning:
        """The conditioning of images ``indices`` on their ``caption`` attribute ("token_caption" or
        "base_caption"); for SDXL with each image's own size and crop as its time ids."""
        texts = [getattr(self.images[i], caption) for i in indices]
        if all(t in self.cache for t in texts):
            text = TextConditioning.cat([self.cache[t] for t in texts])
        else:
            text = encode_prompts(self.model, texts)
        if self.model.kind != "sdxl":
            return text
        size = self.resolution
        rows = [[*self.images[i].original_size, *self.images[i].crop_top_left, size, size] for i in indices]
        embeds = text.prompt_embeds
        return dataclasses.replace(text, add_time_ids=torch.tensor(rows, dtype=embeds.dtype, device=embeds.device))


class ImageLatents:
    """x_0 for images: VAE posterior samples (from cached posterior parameters or encoded at every
    call) scaled for the UNet, or the pixels themselves for a pixel-space model."""

    def __init__(self, model, images: list[TrainImage], cache: bool, device, batch_size: int = 4):
        self.model = model
        self.images = images
        self.device = device
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        if model.vae is not None and cache:
            means, stds = [], []
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    mean, std = self._posterior(list(range(start, min(start + batch_size, len(images)))))
                    means.append(mean)
                    stds.append(std)
            self.mean, self.std = torch.cat(means), torch.cat(stds)

    def _posterior(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.vae
        pixels = torch.stack([self.images[i].pixels for i in indices]).to(self.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        if self.model.vae is None:
            return torch.stack([self.images[i].pixels for i in indices]).to(self.device)
        if self.mean is not None:
            mean, std = self.mean[indices], self.std[indices]
        else:
            with torch.no_grad():
                mean, std = self._posterior(indices)
        noise = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = mean + std * noise
        shift = getattr(self.model.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.model.vae_scaling_factor


@dataclass
class MicroBatch:
    """One micro-batch: the instance rows first, then as many class rows (prior preservation)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    cond: TextConditioning
    #: DCO: the instance rows on their base captions, for the reference prediction.
    reference_cond: TextConditioning | None
    instance_rows: int


@dataclass
class TrainingBatches:
    """Draws the micro-batch of any (step, micro-batch) of process ``rank`` of ``world``."""

    instance_text: CaptionConditioning
    instance_latents: ImageLatents
    #: Prior preservation (dreambooth methods): the class images, or None.
    class_text: CaptionConditioning | None
    class_latents: ImageLatents | None
    noise_scheduler: object
    seed: int
    batch_size: int
    gradient_accumulation_steps: int
    #: The DCO reference prediction needs the base captions of the instance rows.
    with_reference: bool
    device: torch.device
    rank: int = 0
    world: int = 1

    def _noisy(self, latents: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps_max = int(self.noise_scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, timesteps_max, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, prediction_target(self.noise_scheduler, latents, noise, timesteps)

    def micro_batch(self, step: int, micro: int) -> MicroBatch:
        batch = self.batch_size
        counter = ((step * self.gradient_accumulation_steps + micro) * self.world + self.rank) * batch
        generator = seeded_generator(self.seed, step, micro, self.rank)
        indices = sample_indices(len(self.instance_text.images), counter, batch, self.seed, 0)
        noisy, timesteps, target = self._noisy(self.instance_latents.sample(indices, generator), generator)
        cond = self.instance_text.of_images(indices, "token_caption")
        if self.class_text is not None:
            class_indices = sample_indices(len(self.class_text.images), counter, batch, self.seed, 1)
            c_noisy, c_timesteps, c_target = self._noisy(self.class_latents.sample(class_indices, generator), generator)
            noisy, timesteps, target = torch.cat([noisy, c_noisy]), torch.cat([timesteps, c_timesteps]), torch.cat([target, c_target])
            cond = TextConditioning.cat([cond, self.class_text.of_images(class_indices, "base_caption")])
        reference_cond = self.instance_text.of_images(indices, "base_caption") if self.with_reference else None
        return MicroBatch(noisy, timesteps, target, cond, reference_cond, instance_rows=batch)
