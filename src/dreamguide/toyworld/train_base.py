"""Training the toy world's base text-to-image model on freshly generated images.

An ordinary epsilon-prediction diffusion objective on an endless stream of generator images:

* data: :func:`dreamguide.toyworld.render.sample` in worker processes, chunk ``i`` drawn from seed
  ``seed * 1_000_003 + i`` so the stream is a function of the seed; the subjects' (class, color,
  pattern) combinations never appear;
* captions: attributes are sometimes left unsaid (:func:`dreamguide.toyworld.world.random_caption`),
  so short prompts ("a ball on the beach") work and an unsaid style reads as the default, photo;
* classifier-free guidance: ``cfg_dropout`` of the captions are empty;
* the UNet and the text encoder train together from scratch (AdamW, warm-up then cosine decay over
  the time budget), with an exponential moving average of the weights that is what gets saved;
* bf16 autocast on CUDA; the run stops at ``minutes`` or ``steps``, whichever comes first.

The output folder is the model in the pixel format (fp16 safetensors) plus ``training.json``: the
recipe, seed, steps, loss curve, timings and device.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dreamguide.toyworld.model import BASE_PREVIEW_STEPS, BASE_PREVIEW_W_TEXT, ToyModelConfig

RECORD_NAME = "training.json"
PREVIEW_NAME = "preview.png"


@dataclass
class BaseRecipe:
    """Everything that defines a base-model training run (written to ``training.json``)."""

    seed: int = 0
    minutes: float = 8.0
    steps: int = 0  # 0: no step limit, only the time budget
    batch_size: int = 256
    lr: float = 4e-4
    min_lr_fraction: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    chunk_size: int = 512
    workers: int = 0  # 0: one per CPU core, minus one
    model: ToyModelConfig = field(default_factory=ToyModelConfig)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data


def render_chunk(task: tuple[int, int, int, float]) -> tuple[torch.Tensor, list[str]]:
    """Chunk ``index`` of the stream: uint8 images (N, 3, S, S) and their training captions."""
    seed, index, size, cfg_dropout = task
    torch.set_num_threads(1)
    from dreamguide.toyworld.render import render
    from dreamguide.toyworld.subjects import sample_base_labels
    from dreamguide.toyworld.world import random_caption

    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    labels = sample_base_labels(size, generator)
    images = render(labels, generator)
    drop = (torch.rand(size, generator=generator) < cfg_dropout).tolist()
    captions = ["" if d else random_caption(lab, generator) for d, lab in zip(drop, labels)]
    return ((images + 1) * 127.5).round().to(torch.uint8), captions


class ImageStream:
    """Generator chunks in order from a process pool, at most ``ahead`` chunks in flight."""

    def __init__(self, seed: int, chunk_size: int, cfg_dropout: float, workers: int, ahead: int | None = None):
        self.task = lambda i: (seed, i, chunk_size, cfg_dropout)
        self.next_index = 0
        self.pending: deque = deque()
        self.pool = None
        if workers > 0:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(workers)
            for _ in range(ahead or 2 * workers):
                self._submit()

    def _submit(self) -> None:
        self.pending.append(self.pool.apply_async(render_chunk, (self.task(self.next_index),)))
        self.next_index += 1

    def __next__(self) -> tuple[torch.Tensor, list[str]]:
        if self.pool is None:
            self.next_index += 1
            return render_chunk(self.task(self.next_index - 1))
        result = self.pending.popleft().get()
        self._submit()
        return result

    def __iter__(self):
        return self

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


class Batches:
    """Fixed-size batches cut from the chunk stream (chunk order, so the data is a function of the seed)."""

    def __init__(self, stream: ImageStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size
        self.images: list[torch.Tensor] = []
        self.captions: list[str] = []

    def __next__(self) -> tuple[torch.Tensor, list[str]]:
        while len(self.captions) < self.batch_size:
            images, captions = next(self.stream)
            self.images.append(images)
            self.captions.extend(captions)
        images = torch.cat(self.images)
        batch = images[: self.batch_size], self.captions[: self.batch_size]
        self.images, self.captions = [images[self.batch_size :]], self.captions[self.batch_size :]
        return batch


def _lr_factor(step: int, progress: float, recipe: BaseRecipe) -> float:
    warm = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * (recipe.min_lr_fraction + (1 - recipe.min_lr_fraction) * cosine)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def train_base(out, recipe: BaseRecipe = BaseRecipe(), device: str | None = None, init=None, log=print,
               preview: bool = True) -> dict:
    """Train a base model by ``recipe``, save it (EMA weights, fp16) to ``out``; return the run record.

    ``init``: a model folder to start from (its weights; optimizer and EMA start afresh).
    ``preview``: also write ``preview.png``, a grid of samples of fixed prompts and seeds.
    """
    started = time.time()
    # the data workers fork first, before this process has started any thread pools
    workers = recipe.workers or max(1, (os.cpu_count() or 2) - 1)
    stream = ImageStream(recipe.seed, recipe.chunk_size, recipe.cfg_dropout, workers)
    try:
        return _train(stream, workers, started, Path(out), recipe, device, init, log, preview)
    finally:
        stream.close()


def _train(stream, workers, started, out, recipe, device, init, log, preview) -> dict:
    from dreamguide.toyworld.model import (
        build_model,
        encode_text,
        load_toyworld_model,
        parameter_count,
        save_toyworld_model,
    )

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    if init is not None:
        model = load_toyworld_model(init)
        if ToyModelConfig.from_dict(json.loads((Path(init) / RECORD_NAME).read_text())["recipe"]["model"]) != recipe.model:
            raise ValueError(f"--init {init} has a different architecture than the recipe's model config")
    else:
        model = build_model(recipe.model, seed=recipe.seed)
    model.source = "toyworld base model"
    unet, text_encoder, tokenizer = model.unet, model.text_encoders[0], model.tokenizers[0]
    unet.to(device).train()
    text_encoder.to(device).train()
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.99), fused=device.type == "cuda",
    )
    ema = [p.detach().clone().float() for p in params]
    scheduler = model.scheduler
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    num_t = scheduler.config.num_train_timesteps

    batches = Batches(stream, recipe.batch_size)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    budget_s = recipe.minutes * 60
    losses: list[dict] = []
    window: list[float] = []
    step = 0
    data_s = 0.0
    train_started = time.time()
    log(f"training {parameter_count(model) / 1e6:.2f}M parameters on {_device_name(device)}, "
        f"batch {recipe.batch_size}, {workers} data workers, budget {recipe.minutes} min")
    while True:
        elapsed = time.time() - train_started
        if elapsed >= budget_s or (recipe.steps and step >= recipe.steps):
            break
        progress = step / recipe.steps if recipe.steps else elapsed / budget_s
        if recipe.steps and budget_s:
            progress = max(progress, elapsed / budget_s)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, progress, recipe)

        t0 = time.time()
        images_u8, captions = next(batches)
        data_s += time.time() - t0
        x0 = images_u8.to(device, non_blocking=True).float() / 127.5 - 1
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, num_t, (x0.shape[0],), generator=generator, device=device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            context = encode_text(tokenizer, text_encoder, captions)
            pred = unet(x_t, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        d = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - d)
        step += 1
        window.append(loss.detach())
        if step % 100 == 0:
            mean = float(torch.stack(window).mean())
            window = []
            losses.append({"step": step, "loss": round(mean, 5), "seconds": round(time.time() - train_started, 1)})
            if step % 500 == 0:
                log(f"step {step}  loss {mean:.4f}  {time.time() - train_started:.0f}s  "
                    f"({step * recipe.batch_size / (time.time() - train_started):.0f} images/s)")
    stream.close()
    train_s = time.time() - train_started
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval().cpu()
    text_encoder.eval().cpu()
    save_toyworld_model(model, out)
    record = {
        "recipe": recipe.to_dict(),
        "init": str(init) if init else None,
        "parameters": parameter_count(model),
        "steps": step,
        "images_seen": step * recipe.batch_size,
        "final_loss": losses[-1]["loss"] if losses else (float(torch.stack(window).mean()) if window else None),
        "losses": losses,
        "train_seconds": round(train_s, 1),
        "data_wait_seconds": round(data_s, 1),
        "total_seconds": round(time.time() - started, 1),
        "device": _device_name(device),
        "torch": torch.__version__,
        "weights_dtype": "float16",
    }
    from dreamguide.images import write_json

    write_json(out / RECORD_NAME, record)
    if preview:
        unet.to(device)
        text_encoder.to(device)
        write_preview(model, out / PREVIEW_NAME)
    log(f"saved {out} ({step} steps, {train_s:.0f}s)")
    return record


#: One prompt per row of the preview grid; columns are seeds.
PREVIEW_PROMPTS: tuple[str, ...] = (
    "a photo of a red ball on the beach",
    "a blue striped cup in the snow",
    "a pencil sketch of a yellow star under a night sky",
    "a green house in pixel art style",
    "a watercolor painting of a purple tent with a mountain in the background",
    "a neon sign of a ring",
    "a mosaic of an orange dotted box on top of green grass",
    "a cartoon illustration of a white tree in the jungle",
    "an inverted image of a shiny black checkered cup on top of pink fabric",
    "",
)


def write_preview(model, path, prompts=PREVIEW_PROMPTS, seeds=(0, 1, 2, 3), steps: int = BASE_PREVIEW_STEPS,
                  w_text: float = BASE_PREVIEW_W_TEXT):
    """A grid of base-model samples (rows: prompts, columns: seeds), 2x upscaled, saved as PNG."""
    from dreamguide.images import image_grid, save_png
    from dreamguide.toyworld.model import sample_cfg
    from dreamguide.toyworld.render import to_pil

    pairs = [(p, s) for p in prompts for s in seeds]
    images = to_pil(sample_cfg(model, [p for p, _ in pairs], [s for _, s in pairs], steps=steps, w_text=w_text))
    images = [im.resize((64, 64), resample=0) for im in images]
    rows = [images[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]
    grid = image_grid(rows, [f"seed {s}" for s in seeds], [p or "(empty prompt)" for p in prompts])
    return save_png(grid, path, {"steps": steps, "w_text": w_text, "mode": "cfg"})
