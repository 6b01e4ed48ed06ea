"""The training loop: ``train(config) -> TrainResult``.

One step (per micro-batch) of every method:

    x_0      latents of a batch of subject images (cached VAE posterior, or pixels for pixel models)
    eps, t   noise and timesteps from a generator seeded by (seed, step, micro-batch, process)
    x_t      = scheduler.add_noise(x_0, eps, t); target = eps (or the velocity for v-prediction)
    e_ft     = UNet with the LoRA adapter on the token caption (gradients to LoRA and token vectors)
    dreambooth[-ti]  loss = MSE(e_ft, target) [+ prior_loss_weight * MSE on class images]
    dco              e_pre = same UNet, adapter off, base caption, no grad; loss = dco_loss(...)

Trainable parameters (LoRA weights, token vectors) are float32 whatever the mixed precision;
the frozen weights are cast to the mixed-precision dtype.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dreamguide.training import checkpoints as ckpt
from dreamguide.training.config import ConfigError, TrainConfig, save_config
from dreamguide.training.data import TrainImage, check_images_readable, load_images, scan_class_folder, scan_instance_folder
from dreamguide.training.losses import dco_loss, mse_loss, prediction_target
from dreamguide.training.outputs import (
    EMBEDDINGS_FILE,
    KOHYA_FILE,
    LORA_FILE,
    METADATA_KEY,
    lora_parameters,
    save_embeddings,
    save_kohya,
)
from dreamguide.training.tokens import TrainableTokenEmbedding, install, uninstall

logger = logging.getLogger(__name__)

#: Name of the trained LoRA adapter on the UNet (the sampler's default adapter name).
ADAPTER_NAME = "subject"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.toml"
SAMPLES_DIR = "samples"


@dataclass
class TrainResult:
    """What a run produced. ``model`` is the trained model itself: the LoRA adapter ``adapter_name``
    is on its UNet and the learned token is in its tokenizers and text encoders."""

    output_dir: Path
    lora_path: Path
    kohya_path: Path
    embeddings_path: Path | None
    step: int
    #: Loss of each optimizer step run in this call (after resume: only the new steps).
    losses: list[float]
    config: TrainConfig
    model: Any = field(repr=False, default=None)
    adapter_name: str = ADAPTER_NAME


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(*parts))


def _sample_indices(n_items: int, counter: int, count: int, seed: int, stream: int) -> list[int]:
    """Items for global sample positions ``counter .. counter+count-1``: each epoch is a seeded permutation."""
    indices = []
    for position in range(counter, counter + count):
        epoch, offset = divmod(position, n_items)
        order = torch.randperm(n_items, generator=_generator(seed, stream, epoch))
        indices.append(int(order[offset]))
    return indices


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The UNet with its LoRA adapters switched off (the pretrained model), restored on exit."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def add_trainable_lora(unet, rank: int, alpha: float, target_modules) -> dict[str, torch.nn.Parameter]:
    """Add the adapter ``ADAPTER_NAME`` to a frozen ``unet``, its weights float32 and trainable;
    return them under their diffusers keys."""
    from dreamguide.models import add_lora

    add_lora(unet, rank, alpha, ADAPTER_NAME, list(target_modules))
    lora = lora_parameters(unet, ADAPTER_NAME)
    for param in lora.values():
        param.data = param.data.float()
        param.requires_grad_(True)
    return lora


def training_loss(
    unet,
    reference_unet,
    method: str,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    cond: dict,
    reference_cond: dict | None = None,
    *,
    beta: float = 1000.0,
    average: str = "batch",
    instance_rows: int | None = None,
    prior_loss_weight: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The loss of one batch. ``unet`` carries the adapter (possibly DDP-wrapped); ``reference_unet`` is
    the same module unwrapped, run with the adapter off for DCO. Rows past ``instance_rows`` are class
    images (prior preservation, dreambooth methods)."""
    prediction = unet(noisy.to(dtype), timesteps, **_cast(cond, dtype), return_dict=False)[0]
    if method == "dco":
        with torch.no_grad(), adapters_disabled(reference_unet):
            reference = reference_unet(noisy.to(dtype), timesteps, **_cast(reference_cond, dtype), return_dict=False)[0]
        return dco_loss(prediction, reference, target, beta, average)
    if instance_rows is not None and instance_rows < noisy.shape[0]:
        n = instance_rows
        return mse_loss(prediction[:n], target[:n]) + prior_loss_weight * mse_loss(prediction[n:], target[n:])
    return mse_loss(prediction, target)


class _Conditioning:
    """Text conditioning of the training images: cached when it cannot change, live when tokens train."""

    def __init__(self, model, images: list[TrainImage], resolution: int, live_token_captions: bool):
        self.model = model
        self.images = images
        self.resolution = resolution
        self.live = live_token_captions
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        captions = {img.base_caption for img in images}
        if not live_token_captions:
            captions |= {img.token_caption for img in images}
        with torch.no_grad():
            for caption in sorted(captions):
                embeds, pooled = self.encode([caption])
                self.cache[caption] = (embeds[0], None if pooled is None else pooled[0])

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        from dreamguide.models import encode_prompts

        text = encode_prompts(self.model, captions)
        return text.prompt_embeds, text.pooled_prompt_embeds

    def time_ids(self, indices: list[int], device, dtype) -> torch.Tensor | None:
        if self.model.kind != "sdxl":
            return None
        size = self.resolution
        rows = [[*self.images[i].original_size, *self.images[i].crop_top_left, size, size] for i in indices]
        return torch.tensor(rows, dtype=dtype, device=device)

    def unet_kwargs(self, indices: list[int], caption: str) -> dict:
        """``encoder_hidden_states`` (+ SDXL ``added_cond_kwargs``) for images ``indices`` on their
        ``caption`` attribute ("token_caption" or "base_caption")."""
        texts = [getattr(self.images[i], caption) for i in indices]
        if all(t in self.cache for t in texts):
            embeds = torch.stack([self.cache[t][0] for t in texts])
            pooled = None if self.model.kind != "sdxl" else torch.stack([self.cache[t][1] for t in texts])
        else:
            embeds, pooled = self.encode(texts)
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if pooled is not None:
            time_ids = self.time_ids(indices, embeds.device, embeds.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs


class _Latents:
    """x_0 for a batch: VAE posterior samples (from cached posterior parameters or encoded per step)
    scaled for the UNet, or the pixels themselves for a pixel-space model."""

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


def _prepare_data(config: TrainConfig) -> tuple[list, list]:
    d = config.data
    instance = scan_instance_folder(d.instance_dir, d.token, d.class_word, d.instance_prompt)
    classes = scan_class_folder(d.class_dir, d.class_word, d.class_prompt) if d.class_dir else []
    check_images_readable(instance + classes)
    return instance, classes


def _check_output_dir(output_dir: Path, resume: str | None) -> None:
    if resume is None and ckpt.list_checkpoints(output_dir):
        raise ValueError(
            f"{output_dir} already holds checkpoints of a run; resume it with --resume latest, "
            f"or set output.dir to a new folder"
        )


def _check_optional_dependencies(config: TrainConfig) -> None:
    import importlib.util

    if config.train.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train.optimizer = 'adamw8bit' needs bitsandbytes: pip install 'dreamguide[bnb]', "
            "or set train.optimizer = 'adamw'"
        )
    if config.output.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "output.tensorboard = true needs tensorboard: pip install 'dreamguide[tensorboard]', "
            "or set output.tensorboard = false"
        )


def _make_optimizer(config: TrainConfig, groups: list[dict]):
    t = config.train
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _metadata(config: TrainConfig, model, step: int) -> dict[str, Any]:
    import dreamguide

    return {
        "token": config.data.token,
        "class_word": config.data.class_word,
        "base_model": config.model.pretrained or model.source,
        "model_kind": model.kind,
        "method": config.train.method,
        "steps": step,
        "resolution": config.data.resolution,
        "lora_rank": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lr": config.train.lr,
        "ti_lr": config.ti.lr if config.uses_ti else None,
        "dco_beta": config.dco.beta if config.train.method == "dco" else None,
        "dco_average": config.dco.average if config.train.method == "dco" else None,
        "dreamguide_version": dreamguide.__version__,
        "config": config.to_dict(),
    }


def train(config: TrainConfig, resume: str | None = None, model=None, progress: bool = True) -> TrainResult:
    """Fine-tune ``config.model.pretrained`` (or the given ``DiffusionModel``, modified in place) on
    ``config.data``; ``resume`` is ``"latest"`` or a checkpoint folder. Bad data or config raise
    before anything is written."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from dreamguide import models as dg_models

    if model is None and not config.model.pretrained:
        raise ConfigError("model.pretrained is required: a hub id or a local diffusers folder")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, pretrained=config.model.pretrained or model.source)
    )
    config.validate()
    _check_optional_dependencies(config)
    output_dir = Path(config.output.dir)
    _check_output_dir(output_dir, resume)
    checkpoint_path = ckpt.resolve_checkpoint(output_dir, resume) if resume else None
    instance_entries, class_entries = _prepare_data(config)

    t = config.train
    # Each run configures its own mixed precision; the process group (if any) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        log_with="tensorboard" if config.output.tensorboard else None,
        project_dir=str(output_dir / "logs"),
    )
    device = accelerator.device
    weight_dtype = _weight_dtype(t.mixed_precision)
    if model is None:
        # Loaded in float32 on the CPU: the VAE stays float32, the rest is cast down before moving.
        model = dg_models.load_model(config.model.pretrained, dtype=torch.float32, variant=config.model.variant or None)
    resolution = config.data.resolution or model.default_size
    d = config.data
    instance_images = load_images(instance_entries, resolution, d.center_crop, d.allow_upscale, t.seed)
    class_images = load_images(class_entries, resolution, d.center_crop, d.allow_upscale, t.seed + 1)
    # Resolved config: everything the run used, written beside its outputs.
    config = dataclasses.replace(config, data=dataclasses.replace(d, resolution=resolution))

    # ---- model: frozen weights in the mixed-precision dtype, the VAE in float32, trainables in float32
    _freeze(model.unet, device, weight_dtype)
    for encoder in model.text_encoders:
        _freeze(encoder, device, weight_dtype)
    if model.vae is not None:
        _freeze(model.vae, device, torch.float32)
    torch.manual_seed(t.seed)
    lora = add_trainable_lora(model.unet, config.lora.rank, config.lora.alpha, config.lora.target_modules)
    if t.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()

    token_modules: list[TrainableTokenEmbedding] = []
    if config.uses_ti:
        ids = dg_models.add_tokens(model, [d.token], d.class_word)
        for encoder, encoder_ids in zip(model.text_encoders, ids):
            _freeze(encoder, device, weight_dtype)
            token_modules.append(install(encoder, encoder_ids))
    token_params = [m.vectors for m in token_modules]
    initial_norms = [v.detach().norm(dim=-1).clone() for v in token_params]
    ti_steps = math.ceil(config.ti.train_fraction * t.steps)

    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    groups = [{"params": list(lora.values()), "lr": t.lr, "weight_decay": t.weight_decay}]
    if token_params:
        groups.append({"params": token_params, "lr": config.ti.lr, "weight_decay": 0.0})
    optimizer = _make_optimizer(config, groups)
    lr_scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps
    )
    unet, optimizer = accelerator.prepare(model.unet, optimizer)
    base_unet = model.unet

    start_step = 0
    if checkpoint_path is not None:
        state = ckpt.load_checkpoint(checkpoint_path)
        start_step = state["step"]
        if start_step > t.steps:
            raise ConfigError(f"checkpoint {checkpoint_path} is at step {start_step}, past train.steps = {t.steps}")
        missing = set(lora) ^ set(state["adapter"])
        if missing:
            raise ValueError(f"{checkpoint_path}: its adapter does not match this config (first differing key {sorted(missing)[0]!r})")
        if bool(token_params) != (state["embeddings"] is not None):
            raise ValueError(
                f"{checkpoint_path} was saved {'without' if token_params else 'with'} trained token embeddings, "
                f"but this config {'trains' if token_params else 'does not train'} them; resume with the run's own config"
            )
        with torch.no_grad():
            for key, param in lora.items():
                param.copy_(state["adapter"][key])
            for i, param in enumerate(token_params):
                param.copy_(state["embeddings"][f"vectors.{i}"])
                initial_norms[i] = state["embeddings"][f"initial_norms.{i}"].to(initial_norms[i])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["grad_scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["grad_scaler"])

    # ---- data on the device, conditioning cached where it cannot change; outputs start here
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / CONFIG_FILE)
        _truncate_log(output_dir / LOG_FILE, start_step)
    accelerator.wait_for_everyone()
    with torch.no_grad(), accelerator.autocast():
        instance_text = _Conditioning(model, instance_images, resolution, live_token_captions=config.uses_ti)
        class_text = _Conditioning(model, class_images, resolution, live_token_captions=False) if class_images else None
    instance_latents = _Latents(model, instance_images, d.cache_latents, device)
    class_latents = _Latents(model, class_images, d.cache_latents, device) if class_images else None
    # What the steps never use leaves the accelerator: the VAE once latents are cached, the text
    # encoders once captions are encoded (unless the token trains through them).
    parked = [model.vae] if model.vae is not None and d.cache_latents else []
    parked += [] if config.uses_ti else list(model.text_encoders)
    for module in parked:
        module.to("cpu")
    if config.output.tensorboard:
        accelerator.init_trackers("dreamguide", config={"method": t.method, "steps": t.steps})

    rank, world = accelerator.process_index, accelerator.num_processes
    batch = t.batch_size
    timesteps_max = int(noise_scheduler.config.num_train_timesteps)

    def noisy_inputs(latents: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, timesteps_max, (latents.shape[0],), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, prediction_target(noise_scheduler, latents, noise, timesteps)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        counter = ((step * t.gradient_accumulation_steps + micro) * world + rank) * batch
        generator = _generator(t.seed, step, micro, rank)
        indices = _sample_indices(len(instance_images), counter, batch, t.seed, 0)
        latents = instance_latents.sample(indices, generator)
        noisy, timesteps, target = noisy_inputs(latents, generator)
        cond = instance_text.unet_kwargs(indices, "token_caption")
        if class_text is not None:
            class_indices = _sample_indices(len(class_images), counter, batch, t.seed, 1)
            c_noisy, c_timesteps, c_target = noisy_inputs(class_latents.sample(class_indices, generator), generator)
            c_cond = class_text.unet_kwargs(class_indices, "base_caption")
            noisy, timesteps, target = torch.cat([noisy, c_noisy]), torch.cat([timesteps, c_timesteps]), torch.cat([target, c_target])
            cond = _cat_kwargs(cond, c_cond)
        reference_cond = instance_text.unet_kwargs(indices, "base_caption") if t.method == "dco" else None
        return training_loss(
            unet, base_unet, t.method, noisy, timesteps, target, cond, reference_cond,
            beta=config.dco.beta, average=config.dco.average, instance_rows=batch,
            prior_loss_weight=d.prior_loss_weight, dtype=weight_dtype,
        )

    trainable = list(lora.values()) + token_params
    losses: list[float] = []
    log_path = output_dir / LOG_FILE
    bar = _progress_bar(t.steps, start_step, enabled=progress and accelerator.is_local_main_process)
    unet.train()
    for step in range(start_step, t.steps):
        tokens_train = bool(token_params) and step < ti_steps
        for param in token_params:
            param.requires_grad_(tokens_train)
        step_loss = 0.0
        for micro in range(t.gradient_accumulation_steps):
            with accelerator.autocast():
                loss = micro_loss(step, micro) / t.gradient_accumulation_steps
            accelerator.backward(loss)
            step_loss += float(loss.detach())
        if world > 1 and tokens_train:  # the token vectors are outside the DDP-wrapped UNet
            for param in token_params:
                param.grad = accelerator.reduce(param.grad, reduction="mean")
        if t.max_grad_norm > 0:
            accelerator.clip_grad_norm_([p for p in trainable if p.grad is not None], t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if tokens_train and config.ti.renormalize:
            with torch.no_grad():
                for param, norm in zip(token_params, initial_norms):
                    param.mul_((norm / param.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1))
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"the loss became {step_loss} at step {step + 1}; lower train.lr, or use bf16 instead of fp16"
            )
        done = step + 1
        losses.append(step_loss)
        lr = lr_scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if accelerator.is_main_process:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": done, "loss": step_loss, "lr": lr}) + "\n")
        if config.output.tensorboard:
            accelerator.log({"loss": step_loss, "lr": lr}, step=done)
        if config.output.checkpoint_every and done % config.output.checkpoint_every == 0 and done < t.steps:
            _save_checkpoint(accelerator, config, done, lora, token_params, initial_norms, optimizer, lr_scheduler)
        if config.sample.every and done % config.sample.every == 0 and done < t.steps:
            _write_samples(accelerator, config, model, done)
    bar.close()
    unet.eval()

    # ---- outputs
    accelerator.wait_for_everyone()
    if config.output.checkpoint_every and t.steps > start_step:
        _save_checkpoint(accelerator, config, t.steps, lora, token_params, initial_norms, optimizer, lr_scheduler)
    vectors = [param.detach().float().cpu() for param in token_params]
    for encoder in model.text_encoders:
        uninstall(encoder)
    metadata = _metadata(config, model, t.steps)
    lora_path, kohya_path = output_dir / LORA_FILE, output_dir / KOHYA_FILE
    embeddings_path = output_dir / EMBEDDINGS_FILE if config.uses_ti else None
    if accelerator.is_main_process:
        header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
        dg_models.save_lora(base_unet, lora_path, ADAPTER_NAME, metadata=header)
        state_dict = {k: v.detach().float().cpu() for k, v in lora.items()}
        save_kohya(state_dict, kohya_path, config.lora.rank, config.lora.alpha, metadata)
        if embeddings_path is not None:
            save_embeddings(model.kind, d.token, vectors, embeddings_path, metadata)
    accelerator.wait_for_everyone()
    if config.sample.every:
        _write_samples(accelerator, config, model, t.steps)
    accelerator.end_training()
    for module in parked:
        module.to(device)
    return TrainResult(output_dir, lora_path, kohya_path, embeddings_path, t.steps, losses, config, model, ADAPTER_NAME)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _freeze(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """No gradients, in ``dtype``, on ``device`` (cast only when needed: casting warns in diffusers)."""
    module.requires_grad_(False)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    module.to(device)


def _cat_kwargs(a: dict, b: dict) -> dict:
    merged = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        merged["added_cond_kwargs"] = {
            key: torch.cat([a["added_cond_kwargs"][key], b["added_cond_kwargs"][key]]) for key in a["added_cond_kwargs"]
        }
    return merged


def _cast(kwargs: dict, dtype: torch.dtype) -> dict:
    out = {"encoder_hidden_states": kwargs["encoder_hidden_states"].to(dtype)}
    if "added_cond_kwargs" in kwargs:
        out["added_cond_kwargs"] = {k: v.to(dtype) for k, v in kwargs["added_cond_kwargs"].items()}
    return out


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def _save_checkpoint(accelerator, config, step, lora, token_params, initial_norms, optimizer, lr_scheduler) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        embeddings = {}
        for i, (param, norm) in enumerate(zip(token_params, initial_norms)):
            embeddings[f"vectors.{i}"] = param.detach().float()
            embeddings[f"initial_norms.{i}"] = norm.float()
        ckpt.save_checkpoint(
            config.output.dir,
            step,
            adapter={k: v.detach() for k, v in lora.items()},
            optimizer_state=optimizer.state_dict(),
            scheduler_state=lr_scheduler.state_dict(),
            embeddings=embeddings or None,
            scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            keep=config.output.keep_checkpoints,
            extra={"method": config.train.method},
        )
    accelerator.wait_for_everyone()


def _write_samples(accelerator, config, model, step) -> None:
    from dreamguide.training.samples import write_samples

    if accelerator.is_main_process:
        write_samples(config, model, step, ADAPTER_NAME)
    accelerator.wait_for_everyone()
