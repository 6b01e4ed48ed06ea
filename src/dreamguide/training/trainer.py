"""The training loop: ``train(config) -> TrainResult``.

One step (per micro-batch, :mod:`dreamguide.training.batches`) of every method:

    x_0, eps, t, x_t, target   drawn for the micro-batch from generators seeded by its step
    e_ft     = UNet with the LoRA adapter on the token caption (gradients to LoRA and token vectors)
    dreambooth[-ti]  loss = MSE(e_ft, target) [+ prior_loss_weight * MSE on class images]
    dco              e_pre = same UNet, adapter off, base caption, no grad; loss = dco_loss(...)

Trainable parameters (LoRA weights, token vectors) are float32 whatever the mixed precision;
the frozen weights are cast to the mixed-precision dtype.

``train`` runs its phases in order: check the config and the data (nothing is written before),
load the model and images, add the trainable weights and the optimizer, restore a checkpoint,
encode what the steps reuse, run the steps, write the outputs.

A caller that watches a run (a progress display, a cancel button) passes ``on_step``: it is
called after every optimizer step with the number of steps done and the step's loss; when it
returns True the run saves a checkpoint of that step and raises :class:`TrainingStopped`, and
``train(config, resume="latest")`` continues it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dreamguide.filenames import CONFIG_FILE, LOG_FILE, TENSORBOARD_DIR
from dreamguide.lora_files import ADAPTER_NAME, add_lora, lora_parameters
from dreamguide.models import TextConditioning, load_model, parse_dtype
from dreamguide.token_files import add_tokens
from dreamguide.training import checkpoints as ckpt
from dreamguide.training.batches import CaptionConditioning, ImageLatents, TrainingBatches
from dreamguide.training.config import ConfigError, TrainConfig, save_config, train_config_from_dict
from dreamguide.training.data import (
    TrainImage,
    check_caption_lengths,
    check_images_readable,
    load_images,
    scan_class_folder,
    scan_instance_folder,
)
from dreamguide.training.losses import DCO_BETA, dco_loss, mse_loss
from dreamguide.training.outputs import OutputFiles, kohya_metadata, run_metadata, write_outputs
from dreamguide.training.tokens import TrainableTokenEmbedding, install, uninstall


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


class TrainingStopped(Exception):
    """A run stopped early because its ``on_step`` asked it to; ``checkpoint`` resumes it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped after step {step}; resume from {checkpoint} (resume='latest')")
        self.step, self.checkpoint = step, checkpoint


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
    cond: TextConditioning,
    reference_cond: TextConditioning | None = None,
    *,
    beta: float = DCO_BETA,
    average: str = "batch",
    instance_rows: int | None = None,
    prior_loss_weight: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The loss of one batch. ``unet`` carries the adapter (possibly DDP-wrapped); ``reference_unet`` is
    the same module unwrapped, run with the adapter off for DCO. Rows past ``instance_rows`` are class
    images (prior preservation, dreambooth methods)."""
    prediction = unet(noisy.to(dtype), timesteps, **cond.to(dtype=dtype).unet_kwargs(), return_dict=False)[0]
    if method == "dco":
        with torch.no_grad(), adapters_disabled(reference_unet):
            reference_kwargs = reference_cond.to(dtype=dtype).unet_kwargs()
            reference = reference_unet(noisy.to(dtype), timesteps, **reference_kwargs, return_dict=False)[0]
        return dco_loss(prediction, reference, target, beta, average)
    if instance_rows is not None and instance_rows < noisy.shape[0]:
        n = instance_rows
        return mse_loss(prediction[:n], target[:n]) + prior_loss_weight * mse_loss(prediction[n:], target[n:])
    return mse_loss(prediction, target)


@dataclass
class _Trainables:
    """The weights a run trains and what steps them."""

    accelerator: Any
    #: The UNet as the steps call it (DDP-wrapped when distributed) and the module itself.
    unet: Any
    base_unet: torch.nn.Module
    #: LoRA parameters under their diffusers keys (the keys of the checkpoints).
    lora: dict[str, torch.nn.Parameter]
    #: One float32 [n_tokens, width] parameter per text encoder when the token trains, else none.
    token_params: list[torch.nn.Parameter]
    #: Each token vector's norm at the start, for ``ti.renormalize``.
    initial_norms: list[torch.Tensor]
    optimizer: Any
    lr_scheduler: Any
    #: The mixed-precision dtype the frozen weights and the forward passes use.
    weight_dtype: torch.dtype

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora.values()) + self.token_params


def train(
    config: TrainConfig,
    resume: str | None = None,
    model=None,
    progress: bool = True,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """Fine-tune ``config.model.pretrained`` (or the given ``DiffusionModel``, modified in place) on
    ``config.data``; ``resume`` is ``"latest"`` or a checkpoint folder. Bad data or config raise
    before anything is written. ``on_step(steps_done, loss)`` returning True stops the run after a
    checkpoint (:class:`TrainingStopped`; single-process runs)."""
    config = _checked_config(config, model)
    checkpoint_path = _checkpoint_to_resume(Path(config.output.dir), resume)
    instance_entries, class_entries = _scan_images(config)
    accelerator = _make_accelerator(config)
    if model is None:
        # Loaded in float32 on the CPU: the VAE stays float32, the rest is cast down before moving.
        model = load_model(config.model.pretrained, dtype=torch.float32, variant=config.model.variant or None,
                           config=config.model.config or None)
    check_caption_lengths(model, instance_entries, class_entries, config.data.token, config.data.class_word)
    config, instance_images, class_images = _load_images(config, model, instance_entries, class_entries)
    if checkpoint_path is not None:
        _check_resumed_config(Path(config.output.dir), config)
    state = _add_trainables(config, model, accelerator)
    start_step = _restore_checkpoint(state, checkpoint_path, config.train.steps) if checkpoint_path else 0
    _start_outputs(accelerator, config, start_step)
    batches, parked = _prepare_batches(config, model, accelerator, instance_images, class_images)
    losses = _run_steps(config, model, state, batches, start_step, progress, on_step)
    files = _finish(config, model, state, start_step)
    for module in parked:
        module.to(accelerator.device)
    return TrainResult(
        Path(config.output.dir), files.lora, files.kohya, files.embeddings, config.train.steps, losses, config, model
    )


# ---------------------------------------------------------------------------------------------
# Phases of train(), in the order they run


def _checked_config(config: TrainConfig, model) -> TrainConfig:
    """The config with ``model.pretrained`` filled in from an in-memory model, validated, with the
    optional packages it needs installed."""
    if model is None and not config.model.pretrained:
        raise ConfigError("model.pretrained is required: a hub id or a local diffusers folder")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, pretrained=config.model.pretrained or model.source)
    )
    config.validate()
    _check_optional_dependencies(config)
    return config


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
    if config.tracker and importlib.util.find_spec(config.tracker) is None:
        raise ConfigError(
            f"output.tracker = {config.tracker!r} needs {config.tracker}: pip install 'dreamguide[{config.tracker}]', "
            "or set output.tracker = ''"
        )


def _checkpoint_to_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder ``resume`` names; without ``resume``, ``output_dir`` must hold no run."""
    if resume is None:
        if ckpt.list_checkpoints(output_dir):
            raise ValueError(
                f"{output_dir} already holds checkpoints of a run; resume it with --resume latest, "
                f"or set output.dir to a new folder"
            )
        return None
    return ckpt.resolve_checkpoint(output_dir, resume)


_LOG = logging.getLogger(__name__)

#: Config keys a resumed run may change: how long it runs, how often it checkpoints, samples and logs.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.steps", "output.dir", "output.checkpoint_every", "output.keep_checkpoints", "output.tensorboard",
    "output.tracker", "sample.",
)


def _check_resumed_config(output_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume with settings that would make a different run than the checkpoint's.

    The run's resolved ``config.toml`` is compared key by key with ``config`` (both resolved, before
    anything is written): keys in :data:`RESUME_MAY_CHANGE` may differ and are logged; any other
    difference is an error listing each key with its old and new value.
    """
    from dreamguide.config import dotted, read_toml

    stored_path = output_dir / CONFIG_FILE
    if not stored_path.is_file():
        return  # a run of an earlier version: nothing to compare with
    raw = read_toml(stored_path)
    try:  # read as a config, so a key added after the run was started takes its default
        stored = dotted(train_config_from_dict(raw, str(stored_path), validate=False).to_dict())
    except ConfigError:
        stored = dotted(raw)  # a key this version no longer has: compared as written
    current = dotted(config.to_dict())
    changed = {key: (stored.get(key), current.get(key)) for key in sorted(set(stored) | set(current))
               if stored.get(key) != current.get(key)}
    allowed = {k: v for k, v in changed.items() if k.startswith(RESUME_MAY_CHANGE)}
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"resuming {output_dir} with settings that differ from the run's ({stored_path.name}): {lines}. "
            f"Only {', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)} may change on resume; "
            "start a new run in another output.dir to train with other settings"
        )
    for key, (old, new) in allowed.items():
        _LOG.warning("resume: %s changed from %r to %r", key, old, new)


def _scan_images(config: TrainConfig) -> tuple[list, list]:
    """The instance and class image files with their captions, every one checked readable."""
    d = config.data
    instance = scan_instance_folder(d.instance_dir, d.token, d.class_word, d.instance_prompt)
    classes = scan_class_folder(d.class_dir, d.class_word, d.class_prompt) if d.class_dir else []
    check_images_readable(instance + classes)
    return instance, classes


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Each run configures its own mixed precision; the process group (if any) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with=_tracker(config),
        project_dir=str(Path(config.output.dir) / TENSORBOARD_DIR),
    )


def _tracker(config: TrainConfig):
    """What ``Accelerator(log_with=...)`` takes for the run's tracker: "tensorboard", a W&B
    tracker project "dreamguide" with the run's name and ``output.dir`` as its folder, or None."""
    if config.tracker == "wandb":
        from accelerate.tracking import WandBTracker

        return [WandBTracker("dreamguide", name=config.run_name, dir=str(config.output.dir))]
    return config.tracker or None


def hyperparameters(config: TrainConfig) -> dict[str, bool | int | float | str]:
    """Every setting of ``config`` under its dotted key (``train.lr``), as trackers store
    hyperparameters: lists become comma-separated text."""
    from dreamguide.config import dotted

    flat: dict[str, bool | int | float | str] = {
        key: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        for key, value in dotted(config.to_dict()).items()
    }
    flat["run_name"] = config.run_name
    return flat


def _load_images(config: TrainConfig, model, instance_entries, class_entries):
    """(config with ``data.resolution`` resolved, instance images, class images) at that resolution."""
    d, seed = config.data, config.train.seed
    resolution = d.resolution or model.default_size
    instance_images = load_images(instance_entries, resolution, d.center_crop, d.allow_upscale, seed)
    class_images = load_images(class_entries, resolution, d.center_crop, d.allow_upscale, seed + 1)
    # The resolved config: everything the run used, written beside its outputs.
    config = dataclasses.replace(config, data=dataclasses.replace(d, resolution=resolution))
    return config, instance_images, class_images


def _add_trainables(config: TrainConfig, model, accelerator) -> _Trainables:
    """Freeze the model (the mixed-precision dtype; the VAE float32), add the float32 LoRA adapter
    and, with pivotal tuning, the token vectors; build the optimizer and learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    t, device = config.train, accelerator.device
    weight_dtype = parse_dtype("float32" if t.mixed_precision == "no" else t.mixed_precision)
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
        ids = add_tokens(model, [config.data.token], config.data.class_word)
        for encoder, encoder_ids in zip(model.text_encoders, ids):
            _freeze(encoder, device, weight_dtype)
            token_modules.append(install(encoder, encoder_ids))
    token_params = [m.vectors for m in token_modules]
    initial_norms = [v.detach().norm(dim=-1).clone() for v in token_params]

    groups = [{"params": list(lora.values()), "lr": t.lr, "weight_decay": t.weight_decay}]
    if token_params:
        groups.append({"params": token_params, "lr": config.ti.lr, "weight_decay": 0.0})
    optimizer = _make_optimizer(config, groups)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps)
    unet, optimizer = accelerator.prepare(model.unet, optimizer)
    return _Trainables(
        accelerator, unet, model.unet, lora, token_params, initial_norms, optimizer, lr_scheduler, weight_dtype
    )


def _freeze(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """No gradients, in ``dtype``, on ``device`` (cast only when needed: casting warns in diffusers)."""
    module.requires_grad_(False)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    module.to(device)


def _make_optimizer(config: TrainConfig, groups: list[dict]):
    t = config.train
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _restore_checkpoint(state: _Trainables, path: Path, steps: int) -> int:
    """Load the trained weights, optimizer, schedule and loss-scaler state of a checkpoint; return its step."""
    saved = ckpt.load_checkpoint(path)
    step = saved["step"]
    if step > steps:
        raise ConfigError(f"checkpoint {path} is at step {step}, past train.steps = {steps}")
    missing = set(state.lora) ^ set(saved["adapter"])
    if missing:
        raise ValueError(f"{path}: its adapter does not match this config (first differing key {sorted(missing)[0]!r})")
    if bool(state.token_params) != (saved["embeddings"] is not None):
        trains = bool(state.token_params)
        raise ValueError(
            f"{path} was saved {'without' if trains else 'with'} trained token embeddings, "
            f"but this config {'trains' if trains else 'does not train'} them; resume with the run's own config"
        )
    with torch.no_grad():
        for key, param in state.lora.items():
            param.copy_(saved["adapter"][key])
        for i, param in enumerate(state.token_params):
            param.copy_(saved["embeddings"][f"vectors.{i}"])
            state.initial_norms[i] = saved["embeddings"][f"initial_norms.{i}"].to(state.initial_norms[i])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    scaler = state.accelerator.scaler
    if saved["grad_scaler"] is not None and scaler is not None:
        scaler.load_state_dict(saved["grad_scaler"])
    return step


def _start_outputs(accelerator, config: TrainConfig, start_step: int) -> None:
    """Create ``output.dir`` with the resolved config; keep the log of the steps up to ``start_step``."""
    output_dir = Path(config.output.dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / CONFIG_FILE)
        _truncate_log(output_dir / LOG_FILE, start_step)
    accelerator.wait_for_everyone()


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write: repaired by dropping it
            _LOG.warning("%s: dropping an unreadable line %r (written when a run was killed)", path, line[:80])
    if len(kept) != len(lines):
        from dreamguide.atomic import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _prepare_batches(
    config: TrainConfig, model, accelerator, instance_images: list[TrainImage], class_images: list[TrainImage]
) -> tuple[TrainingBatches, list[torch.nn.Module]]:
    """Encode what the steps reuse (captions that cannot change; latents with ``data.cache_latents``),
    then move what the steps never use off the accelerator: the VAE once latents are cached, the
    text encoders once captions are encoded (unless the token trains through them). Returns the
    batches and the modules moved."""
    from diffusers import DDPMScheduler

    d, resolution, device = config.data, config.data.resolution, accelerator.device
    with torch.no_grad(), accelerator.autocast():
        instance_text = CaptionConditioning(model, instance_images, resolution, live_token_captions=config.uses_ti)
        class_text = CaptionConditioning(model, class_images, resolution, live_token_captions=False) if class_images else None
    instance_latents = ImageLatents(model, instance_images, d.cache_latents, device)
    class_latents = ImageLatents(model, class_images, d.cache_latents, device) if class_images else None
    parked = [model.vae] if model.vae is not None and d.cache_latents else []
    parked += [] if config.uses_ti else list(model.text_encoders)
    for module in parked:
        module.to("cpu")
    if config.tracker:
        accelerator.init_trackers("dreamguide", config=hyperparameters(config))
    batches = TrainingBatches(
        instance_text,
        instance_latents,
        class_text,
        class_latents,
        noise_scheduler=DDPMScheduler.from_config(model.scheduler.config),
        seed=config.train.seed,
        batch_size=config.train.batch_size,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        with_reference=config.train.method == "dco",
        device=device,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    return batches, parked


def _run_steps(
    config: TrainConfig, model, state: _Trainables, batches: TrainingBatches, start_step: int, progress: bool,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> list[float]:
    """Run the optimizer steps ``start_step .. train.steps``, logging, checkpointing and sampling as
    configured; return the loss of each. ``on_step`` returning True before the last step saves a
    checkpoint and raises :class:`TrainingStopped`."""
    t, accelerator = config.train, state.accelerator
    ti_steps = math.ceil(config.ti.train_fraction * t.steps)
    losses: list[float] = []
    bar = _progress_bar(t.steps, start_step, enabled=progress and accelerator.is_local_main_process)
    state.unet.train()
    for step in range(start_step, t.steps):
        tokens_train = bool(state.token_params) and step < ti_steps
        loss = _optimizer_step(config, state, batches, step, tokens_train)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss} at step {step + 1}; lower train.lr, or use bf16 instead of fp16"
            )
        done = step + 1
        losses.append(loss)
        _log_step(config, accelerator, bar, done, loss, state.lr_scheduler.get_last_lr()[0])
        if config.output.checkpoint_every and done % config.output.checkpoint_every == 0 and done < t.steps:
            _save_checkpoint(config, state, done)
        if config.sample.every and done % config.sample.every == 0 and done < t.steps:
            _write_samples(accelerator, config, model, done)
        if on_step is not None and on_step(done, loss) and done < t.steps:
            saved = config.output.checkpoint_every and done % config.output.checkpoint_every == 0
            if not saved:
                _save_checkpoint(config, state, done)
            bar.close()
            state.unet.eval()
            raise TrainingStopped(done, Path(config.output.dir) / f"checkpoint-{done}")
    bar.close()
    state.unet.eval()
    return losses


def _optimizer_step(config: TrainConfig, state: _Trainables, batches: TrainingBatches, step: int, tokens_train: bool) -> float:
    """One optimizer step over the gradient-accumulation micro-batches of ``step``; returns its loss."""
    t, accelerator = config.train, state.accelerator
    for param in state.token_params:
        param.requires_grad_(tokens_train)
    step_loss = 0.0
    for micro in range(t.gradient_accumulation_steps):
        with accelerator.autocast():
            batch = batches.micro_batch(step, micro)
            loss = training_loss(
                state.unet, state.base_unet, t.method, batch.noisy, batch.timesteps, batch.target,
                batch.cond, batch.reference_cond, beta=config.dco.beta, average=config.dco.average,
                instance_rows=batch.instance_rows, prior_loss_weight=config.data.prior_loss_weight,
                dtype=state.weight_dtype,
            ) / t.gradient_accumulation_steps
        accelerator.backward(loss)
        step_loss += float(loss.detach())
    if accelerator.num_processes > 1 and tokens_train:  # the token vectors are outside the DDP-wrapped UNet
        for param in state.token_params:
            param.grad = accelerator.reduce(param.grad, reduction="mean")
    if t.max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for p in state.parameters if p.grad is not None], t.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if tokens_train and config.ti.renormalize:
        with torch.no_grad():
            for param, norm in zip(state.token_params, state.initial_norms):
                param.mul_((norm / param.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1))
    return step_loss


def _log_step(config: TrainConfig, accelerator, bar, done: int, loss: float, lr: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if accelerator.is_main_process:
        with open(Path(config.output.dir) / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": done, "loss": loss, "lr": lr}) + "\n")
    if config.tracker:
        accelerator.log({"loss": loss, "lr": lr}, step=done)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def _save_checkpoint(config: TrainConfig, state: _Trainables, step: int) -> None:
    accelerator = state.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        embeddings = {}
        for i, (param, norm) in enumerate(zip(state.token_params, state.initial_norms)):
            embeddings[f"vectors.{i}"] = param.detach().float()
            embeddings[f"initial_norms.{i}"] = norm.float()
        ckpt.save_checkpoint(
            config.output.dir,
            step,
            adapter={k: v.detach() for k, v in state.lora.items()},
            optimizer_state=state.optimizer.state_dict(),
            scheduler_state=state.lr_scheduler.state_dict(),
            embeddings=embeddings or None,
            scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            keep=config.output.keep_checkpoints,
            extra={"method": config.train.method},
        )
    accelerator.wait_for_everyone()


def _write_samples(accelerator, config: TrainConfig, model, step: int) -> None:
    from dreamguide.training.samples import write_samples

    if accelerator.is_main_process:
        write_samples(config, model, step, ADAPTER_NAME)
    accelerator.wait_for_everyone()


def _finish(config: TrainConfig, model, state: _Trainables, start_step: int) -> OutputFiles:
    """The last checkpoint, the token vectors written into the text encoders, the output files and
    the last samples; returns the output files."""
    t, accelerator = config.train, state.accelerator
    accelerator.wait_for_everyone()
    if config.output.checkpoint_every and t.steps > start_step:
        _save_checkpoint(config, state, t.steps)
    vectors = [param.detach().float().cpu() for param in state.token_params]
    for encoder in model.text_encoders:
        uninstall(encoder)
    files = OutputFiles.in_folder(config.output.dir, with_embeddings=config.uses_ti, name=config.run_name)
    if accelerator.is_main_process:
        kohya = kohya_metadata(config, model, t.steps, config.run_name)
        write_outputs(files, model, vectors, run_metadata(config, model, t.steps), config.data.token, kohya)
    accelerator.wait_for_everyone()
    if config.sample.every:
        _write_samples(accelerator, config, model, t.steps)
    accelerator.end_training()
    return files
