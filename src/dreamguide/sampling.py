"""Sampling with guidance (SPEC sections 1-2): the batched ``Sampler`` and saving its images.

Every image is a :class:`SampleItem` (prompts, guidance mode and weights, seed).
``Sampler.sample_items`` packs items into batches of up to ``batch_size`` images (modes,
prompts and weights may differ inside a batch) and runs each batch through the one denoising
loop, :func:`dreamguide.denoise.denoise`: at every step the rows all its images need go through
ONE batched UNet forward, each row routed to the pretrained or the personalized weights
(:mod:`dreamguide.unet_rows`), and ``guidance.guide`` combines each image's rows into the
prediction the scheduler steps with. The same loop serves SDXL, SD 1.x/2.x (VAE latents) and
pixel-space models (no VAE). ``Sampler.sample`` does the same for one :class:`SampleSettings`
(one prompt, its modes x seeds). Settings, items and results are defined in
:mod:`dreamguide.sample_settings`; import them from here::

    sampler = Sampler.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                      lora="out/lora.safetensors", embeddings="out/embeddings.safetensors",
                                      token="<sks>")
    settings = SampleSettings(prompt="a watercolor painting of <sks> dog", token="<sks>", class_word="dog",
                              modes=("cfg", "consistency", "pr"), seeds=(0, 1))
    for result in sampler.sample(settings):
        result.image.save(f"{result.mode}-{result.seed}.png")

Reproducibility: every image has its own ``torch.Generator`` seeded with its seed, which
draws its initial noise (on the CPU, so devices agree) and any noise a stochastic scheduler
adds; so an image does not depend on the batch it was sampled in (up to float rounding), and
every mode starts from the same noise for the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dreamguide import guidance
from dreamguide.consistency_trace import trace_document
from dreamguide.denoise import SCHEDULERS, NonFiniteError, clipped_step_kwargs, make_scheduler  # noqa: F401
from dreamguide.guidance import ParallelRescaling
from dreamguide.sample_settings import (  # noqa: F401 (the sampling API: defined there, imported from here)
    SampleItem,
    SampleResult,
    SampleSettings,
    check_finite,
    check_run,
    no_personalization_message,
    parse_modes,
    parse_seeds,
    reads_personalized,
)
from dreamguide.unet_rows import PERSONALIZED_UNET_ROUTE

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from dreamguide.models import DiffusionModel
    from dreamguide.unet_rows import RowLayout

#: ``Sampler(adapter_name=AUTO)``: the UNet's one LoRA adapter, if it has exactly one.
AUTO = "auto"
#: Routed UNet forwards one sampling call keeps between its batches (each may hold a captured CUDA
#: graph and its memory): the two row shapes of a personalized-steps schedule.
ROW_CALLS_KEPT = 2


# ---------------------------------------------------------------------------------------------
# The sampler


def _check_file(flag: str, path: str | os.PathLike | None, folder: bool = False) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.exists():
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"{flag} {kind} {path} does not exist; check the path")
    if folder and not path.is_dir():
        raise FileNotFoundError(f"{flag} {path} is not a folder; pass the folder holding config.json")
    return path


def _split_variance(output, channels: int, scheduler):
    """Models that also predict a variance (2x output channels): guide the mean, keep the variance
    for schedulers that use it (``variance_type`` learned/learned_range), drop it for the others."""
    if output.shape[1] != 2 * channels:
        return output, None
    prediction, variance = output.split(channels, dim=1)
    learned = str(scheduler.config.get("variance_type", "")).startswith("learned")
    return prediction, (variance if learned else None)


@dataclass(frozen=True)
class _Rule:
    """Consecutive images of a batch guided by one rule: mode, weights, PR switches."""

    mode: guidance.GuidanceMode
    w_text: float
    w_cons: float
    pr: ParallelRescaling
    shaping: guidance.ConsistencyShaping
    images: tuple[int, ...]


def _rules(items: Sequence[SampleItem]) -> list[_Rule]:
    rules: list[_Rule] = []
    for j, item in enumerate(items):
        if rules and items[j - 1].rule == item.rule:
            last = rules[-1]
            rules[-1] = dataclasses.replace(last, images=(*last.images, j))
        else:
            mode = guidance.get_mode(item.mode)
            rules.append(_Rule(mode, item.w_text, item.w_cons, item.pr, item.shaping, (j,)))
    return rules


def _combine(layout: "RowLayout", rules: Sequence[_Rule], channels: int, scheduler, output, i: int, steps: int,
             off: bool = False):
    """The guided prediction of every image of the batch from the UNet rows of step ``i`` of ``steps``.

    Each rule combines the rows of its images (``guidance.guide``); a learned variance (if the
    scheduler uses one) is taken from the row of each image's last prediction. A rule that
    depends on the progress through sampling reads ``i / max(steps - 1, 1)``. ``off``: the step
    is outside the personalized-steps interval, so the modes with a consistency term give ``cfg``.
    """
    import torch

    prediction, variance = _split_variance(output, channels, scheduler)
    progress = i / max(steps - 1, 1)
    parts = []
    for rule in rules:
        if off and rule.mode.has_consistency:
            cfg_rows = {need: layout.take(prediction, need, rule.images) for need in ("uncond", "base")}
            parts.append(guidance.guide("cfg", guidance.Predictions(**cfg_rows), rule.w_text))
            continue
        rows = guidance.Predictions(**{need: layout.take(prediction, need, rule.images) for need in rule.mode.needs})
        parts.append(guidance.guide(rule.mode, rows, rule.w_text, rule.w_cons, rule.pr, shaping=rule.shaping,
                                    progress=progress))
    guided = parts[0] if len(parts) == 1 else torch.cat(parts)
    if variance is not None:
        kept = [layout.take(variance, rule.mode.needs[-1], rule.images) for rule in rules]
        guided = torch.cat([guided, kept[0] if len(kept) == 1 else torch.cat(kept)], dim=1)
    return guided


def _batches(items: Sequence[SampleItem], size: int) -> list[list[int]]:
    """Item indices in batches of up to ``size``, consecutive among the items of one personalized-steps
    schedule (a batch has one); inside a batch, images of one rule are adjacent."""
    groups: dict = {}
    for k, item in enumerate(items):
        groups.setdefault(item.personalized_steps, []).append(k)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), size):
            batch = members[start : start + size]
            order = list(dict.fromkeys(items[k].rule for k in batch))
            batches.append(sorted(batch, key=lambda k: order.index(items[k].rule)))
    return batches


class _PersonalizedRows:
    """The model function of a batch whose personalized-steps schedule skips the personalized row.

    Evaluated steps run every row (``full``); the other steps run the rows without the
    personalized rows of the consistency images (``reduced``: the ``cfg`` rows, a second shape,
    so a second CUDA graph) and put in their place e_c + g_cons', with g_cons' reused
    (``personalized_steps.Carried``) or zero where the row is off, so the output always has
    ``full``'s rows. Steps are counted by calls: one call per denoising step, in order.
    """

    def __init__(self, schedule, steps: int, images: Sequence[int], full, reduced, channels: int) -> None:
        from dreamguide.personalized_steps import Carried

        self.plan = schedule.plan(steps)
        self.images = list(images)
        self.full, self.reduced, self.channels = full, reduced, channels
        self.carried = Carried(schedule)
        self.calls = 0
        # Where each row of the full layout comes from: a reduced row, or synthesized row s (after them).
        reduced_rows = {row: r for r, row in enumerate(reduced.layout.rows)}
        synthesized = {j: s for s, j in enumerate(self.images)}
        self.order = [reduced_rows[row] if row in reduced_rows else len(reduced_rows) + synthesized[row[1]]
                      for row in full.layout.rows]

    def __call__(self, x_in, t):
        import torch

        from dreamguide.models import take_rows
        from dreamguide.personalized_steps import EVALUATE, REUSE

        i = self.calls
        self.calls += 1
        status = self.plan[i]
        if status == EVALUATE:
            output = self.full(x_in, t)
            prediction = output[:, : self.channels]
            layout = self.full.layout
            uncond, base, personalized = (layout.take(prediction, need, self.images)
                                          for need in ("uncond", "base", "personalized"))
            self.carried.remember(i, personalized - base, base - uncond)
            return output
        output = self.reduced(x_in, t)
        layout = self.reduced.layout
        uncond = layout.take(output[:, : self.channels], "uncond", self.images)
        base = layout.take(output, "base", self.images)  # with its variance channels, if any
        g_cons = self.carried.recall(i, base[:, : self.channels] - uncond) if status == REUSE else None
        synthesized = base.clone()
        if g_cons is not None:
            synthesized[:, : self.channels] += g_cons.to(synthesized.dtype)
        return take_rows(torch.cat([output, synthesized]), self.order)


class _BatchRows:
    """One row layout's UNet call for a batch: gathers the rows, calls the UNet, returns float32 rows."""

    def __init__(self, layout, call, conditioning, dtype) -> None:
        self.layout, self.call, self.conditioning, self.dtype = layout, call, conditioning, dtype

    def __call__(self, x_in, t):
        return self.call(self.layout.gather(x_in).to(self.dtype), t, self.conditioning).float()


def _only_adapter(model: "DiffusionModel", personalized_unet) -> str | None:
    """The adapter ``Sampler(adapter_name=AUTO)`` routes personalized rows to."""
    if personalized_unet is not None:
        return None
    adapters = list(getattr(model.unet, "peft_config", None) or {})
    if len(adapters) > 1:
        raise ValueError(
            f"the UNet has several LoRA adapters ({', '.join(adapters)}); pass adapter_name= the personalized "
            "one (or adapter_name=None to route none)"
        )
    return adapters[0] if adapters else None


class Sampler:
    """Samples a ``DiffusionModel`` with any guidance mode (see the module docstring).

    The personalized model is one of: a LoRA adapter on ``model.unet`` named ``adapter_name``
    (routed per row inside one forward; the default ``"auto"`` takes the UNet's adapter when it
    has exactly one, none when it has none), a separate fully fine-tuned ``personalized_unet``, or
    only learned token embeddings (``embeddings``: then the same UNet serves every row and
    the identity comes from the token prompt alone). ``sources`` records where the weights came
    from (keys ``model``, ``lora``, ``embeddings``, ``personalized_unet``) for the image metadata.
    ``fast``: the UNet rows of a batch take the fast path where it is exact (``unet_rows.row_function``).
    ``keep_graphs``: keep the routed forwards (on CUDA: their captured graphs and the graphs' memory)
    from one sampling call to the next, so repeated calls of the same batch shape replay instead of
    capturing again; by default they are freed when each call returns.
    """

    def __init__(
        self,
        model: "DiffusionModel",
        adapter_name: str | None = AUTO,
        personalized_unet: "torch.nn.Module | None" = None,
        *,
        embeddings: str | os.PathLike | None = None,
        sources: dict | None = None,
        fast: bool = True,
        keep_graphs: bool = False,
    ) -> None:
        if adapter_name == AUTO:
            adapter_name = _only_adapter(model, personalized_unet)
        if adapter_name is not None and personalized_unet is not None:
            raise ValueError("give either adapter_name (a LoRA on model.unet) or personalized_unet, not both")
        if adapter_name is not None:
            peft_config = getattr(model.unet, "peft_config", {}) or {}
            if adapter_name not in peft_config:
                known = ", ".join(peft_config) or "none"
                raise ValueError(
                    f"the UNet has no adapter named {adapter_name!r} (adapters: {known}); load it with "
                    "dreamguide.lora_files.load_lora(model, path) first"
                )
        self.model = model
        self.adapter_name = adapter_name
        self.personalized_unet = personalized_unet
        self.fast = fast
        self.keep_graphs = keep_graphs
        self._row_calls: dict = {}
        self.sources = {"model": model.source, "lora": None, "embeddings": None, "personalized_unet": None}
        if embeddings is not None:
            self.sources["embeddings"] = os.fspath(embeddings)
        self.sources.update(sources or {})
        self._float32_vae = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike,
        lora: str | os.PathLike | None = None,
        embeddings: str | os.PathLike | None = None,
        personalized_unet: str | os.PathLike | None = None,
        token: str | None = None,
        dtype: "torch.dtype | str | None" = None,
        device: "torch.device | str | None" = None,
        fast: bool = True,
        model_config: str | os.PathLike | None = None,
    ) -> "Sampler":
        """Load a model and its personalized weights: a LoRA, token embeddings and/or a full UNet folder.

        ``dtype`` ``None``/``"auto"`` means float16 on CUDA and float32 elsewhere; ``device``
        ``None`` means CUDA when available. ``model_config``: the config folder (or hub id) a
        single-file checkpoint is read with (``load_model``'s ``config``).
        """
        import torch

        from dreamguide import lora_files, models, token_files

        lora_path = _check_file("LoRA", lora)
        embeddings_path = _check_file("embeddings", embeddings)
        unet_path = _check_file("personalized UNet", personalized_unet, folder=True)
        if lora_path is not None and unet_path is not None:
            raise ValueError("give either a LoRA or a personalized UNet, not both")
        if embeddings_path is not None and not token:
            raise ValueError(
                f"embeddings {embeddings_path} need the token they were learned for; pass token='<sks>' (--token)"
            )
        device = models.parse_device(device)
        dtype = models.parse_dtype(dtype, device)
        model = models.load_model(model_id_or_path, dtype=dtype, device=device, config=model_config)
        if embeddings_path is not None:
            token_files.load_embeddings(model, embeddings_path, token)
        unet = None
        if lora_path is not None:
            lora_files.load_lora(model, lora_path)
        if unet_path is not None:
            unet = load_personalized_unet(unet_path, model, dtype=dtype, device=device)
        sources = {
            "model": os.fspath(model_id_or_path),
            "lora": None if lora_path is None else os.fspath(lora),
            "embeddings": None if embeddings_path is None else os.fspath(embeddings),
            "personalized_unet": None if unet_path is None else os.fspath(personalized_unet),
        }
        if model_config is not None:
            sources["model_config"] = os.fspath(model_config)
        return cls(
            model,
            adapter_name=AUTO if lora_path is not None else None,
            personalized_unet=unet,
            sources=sources,
            fast=fast,
        )

    # -- properties ----------------------------------------------------------------------------

    @property
    def device(self) -> "torch.device":
        return self.model.unet.device

    @property
    def dtype(self) -> "torch.dtype":
        return self.model.unet.dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor, or the UNet's downsampling for pixel models."""
        if self.model.vae is not None:
            return int(self.model.vae_scale_factor)
        return 2 ** (len(self.model.unet.config.down_block_types) - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""
        sample = self.model.unet.config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
        factor = int(self.model.vae_scale_factor) if self.model.vae is not None else 1
        return int(h) * factor, int(w) * factor

    def is_personalized(self, token: str | None = None) -> bool:
        """True if there is a personalized model: an adapter, a personalized UNet or learned token embeddings."""
        if self.adapter_name is not None or self.personalized_unet is not None or self.sources.get("embeddings"):
            return True
        return bool(token) and any(token in t.get_added_vocab() for t in self.model.tokenizers)

    def resolve_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The (height, width) to sample at (``None``: native), checked against ``size_multiple``."""
        native_h, native_w = self.native_size
        height, width = height or native_h, width or native_w
        multiple = self.size_multiple
        what = "the VAE downsampling factor" if self.model.vae is not None else "the UNet's downsampling factor"
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                lower, upper = value - value % multiple, value - value % multiple + multiple
                nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                raise ValueError(
                    f"{name} {value} is not divisible by {multiple} ({what} of this model); use e.g. {nearest}"
                )
        return height, width

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, settings: SampleSettings, progress: bool = True,
               on_batch: "Callable[[list[SampleResult]], None] | None" = None) -> list[SampleResult]:
        """Sample every (mode, seed) of ``settings``; results come mode by mode, seeds in order.

        ``on_batch`` gets each batch's results as soon as they are done (to save them at once)."""
        return self.sample_items(
            settings.items(),
            steps=settings.steps,
            scheduler=settings.scheduler,
            batch_size=settings.batch_size,
            trace=settings.trace,
            progress=progress,
            height=settings.height,
            width=settings.width,
            clipped_model_output=settings.clipped_model_output,
            on_batch=on_batch,
        )

    def sample_items(
        self,
        items: Iterable[SampleItem],
        *,
        steps: int | None = None,
        scheduler: str | None = None,
        batch_size: int | None = None,
        trace: bool | None = None,
        progress: bool = True,
        height: int | None = None,
        width: int | None = None,
        clipped_model_output: bool | None = None,
        on_batch: "Callable[[list[SampleResult]], None] | None" = None,
    ) -> list[SampleResult]:
        """Sample every item; the results come in item order (``on_batch`` also gets each batch's
        results as soon as that batch is done).

        Items are packed in order into batches of up to ``batch_size`` images, whatever their
        prompts, modes and weights (items of different personalized-steps schedules go to separate
        batches); each batch is one denoising loop with one UNet forward per step. Each distinct
        prompt is encoded once per call. ``None`` arguments take the
        :class:`SampleSettings` defaults (``height``/``width``: the model's native size).
        """
        import torch
        from tqdm.auto import tqdm

        steps = SampleSettings.steps if steps is None else steps
        scheduler = SampleSettings.scheduler if scheduler is None else scheduler
        batch_size = SampleSettings.batch_size if batch_size is None else batch_size
        trace = SampleSettings.trace if trace is None else trace
        clipped = SampleSettings.clipped_model_output if clipped_model_output is None else clipped_model_output
        check_run(steps, batch_size, scheduler)
        items = list(items)
        for item in items:
            if not isinstance(item, SampleItem):
                raise TypeError(f"sample_items takes SampleItem objects, got {type(item).__name__}")
        if not items:
            return []
        needing = [item for item in items if reads_personalized(item.mode)]
        if any(not self.is_personalized(token) for token in dict.fromkeys(item.token for item in needing)):
            raise ValueError(no_personalization_message(item.mode for item in needing))
        self._check_prompt_lengths(items)
        height, width = self.resolve_size(height, width)
        made = make_scheduler(self.model.scheduler, scheduler)
        run = {"steps": steps, "scheduler": scheduler, "scheduler_class": type(made).__name__,
               "clipped_model_output": bool(clipped and clipped_step_kwargs(made)), "height": height, "width": width}
        batches = _batches(items, batch_size)
        results: list[SampleResult | None] = [None] * len(items)
        try:
            with torch.no_grad():
                texts = list(dict.fromkeys(t for i in items for t in (i.negative_prompt, i.base_prompt, i.prompt)))
                conditioning = self._encode(texts, height, width)
                prompt_rows = {text: row for row, text in enumerate(texts)}
                with tqdm(total=len(batches) * steps, disable=not progress, desc="sampling", unit="step") as bar:
                    for batch in batches:
                        batch_items = [items[k] for k in batch]
                        images = self._sample_batch(batch_items, conditioning, prompt_rows, run, trace, clipped, bar)
                        for k, item, (image, records) in zip(batch, batch_items, images):
                            metadata = self._metadata(item, run)
                            results[k] = SampleResult(image, item.seed, item.mode, item.prompt, item.base_prompt,
                                                      metadata, records)
                        if on_batch is not None:
                            on_batch([results[k] for k in batch])
        finally:  # this call's routed forwards (and CUDA graphs) are freed, unless the sampler keeps them
            if not self.keep_graphs:
                self.forget_graphs()
        return results

    def _portable_sources(self) -> dict:
        """The model and personalized weights as PNG metadata names them: a Hub id or a base name,
        the SHA-256 of the content (:mod:`dreamguide.provenance`), and the short hashes A1111
        writes (``Model hash``, ``Lora hashes``, ``TI hashes``); worked out once per sampler."""
        from dreamguide import provenance

        key = tuple(sorted((k, str(v)) for k, v in self.sources.items()))
        cached = getattr(self, "_portable_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        fields: dict = {}
        for name in ("model", "lora", "embeddings", "personalized_unet"):
            found = provenance.portable(self.sources.get(name))
            fields[name], fields[f"{name}_sha256"] = found["name"], found["sha256"]
        hashes: dict = {"model": provenance.short_model_hash(fields["model_sha256"])}
        lora = self.sources.get("lora")
        if lora and Path(lora).is_file() and Path(lora).suffix == ".safetensors":
            hashes["lora"] = {Path(lora).stem: provenance.short_network_hash(provenance.addnet_hash(lora))}
        if fields["embeddings_sha256"]:
            hashes["ti"] = provenance.short_network_hash(fields["embeddings_sha256"])  # keyed by token below
        fields["hashes"] = hashes
        self._portable_cache = (key, fields)
        return fields

    def _metadata(self, item: SampleItem, run: dict) -> dict:
        """Everything that determines one image, as stored in its PNG."""
        from dreamguide import __version__

        sources = self._portable_sources()
        ti = "ti" in sources["hashes"] and bool(item.token)
        return {
            "prompt": item.prompt,
            "base_prompt": item.base_prompt,
            "negative_prompt": item.negative_prompt,
            "token": item.token,
            "class_word": item.class_word,
            "mode": item.mode,
            "w_text": item.w_text,
            "w_cons": item.w_cons,
            "pr": item.pr.to_dict(),
            "shaping": item.shaping.to_dict(),
            "personalized_steps": item.personalized_steps.to_dict(),
            "seed": item.seed,
            "steps": run["steps"],
            "scheduler": run["scheduler"],
            "scheduler_class": run["scheduler_class"],
            "clipped_model_output": run["clipped_model_output"],
            **sources,
            "hashes": {**{k: v for k, v in sources["hashes"].items() if k != "ti"},
                       **({"ti": {item.token: sources["hashes"]["ti"]}} if ti else {})},
            "model_kind": self.model.kind,
            "height": run["height"],
            "width": run["width"],
            "dtype": str(self.dtype).removeprefix("torch."),
            "dreamguide_version": __version__,
        }

    def _sample_batch(self, items, conditioning, prompt_rows, run, trace, clipped, bar) -> list[tuple]:
        """Denoise one batch of images; returns (image, trace records) per item."""
        from dreamguide import unet_rows
        from dreamguide.consistency_trace import ConsistencyTrace, TracedImages
        from dreamguide.denoise import NonFiniteCheck, denoise, initial_noise
        from dreamguide.personalized_steps import OFF

        unet = self.model.unet
        scheduler = make_scheduler(self.model.scheduler, run["scheduler"])
        scheduler.set_timesteps(run["steps"], device=self.device)
        factor = self.model.vae_scale_factor if self.model.vae is not None else 1
        shape = (unet.config.in_channels, run["height"] // factor, run["width"] // factor)
        noise, generators = initial_noise([item.seed for item in items], shape)
        x = noise.to(self.device) * scheduler.init_noise_sigma

        rules = _rules(items)
        needs = [guidance.get_mode(item.mode).needs for item in items]
        full = self._batch_rows(unet_rows.RowLayout.of(needs), items, conditioning, prompt_rows)
        layout = full.layout
        rows = layout.rows
        channels = x.shape[1]
        schedule = items[0].personalized_steps
        skipping = [j for j, item in enumerate(items) if guidance.get_mode(item.mode).has_consistency]
        plan = None
        model = full
        if skipping and not schedule.every_step:
            reduced_needs = [tuple(n for n in need if n != "personalized") if j in skipping else need
                             for j, need in enumerate(needs)]
            reduced = self._batch_rows(unet_rows.RowLayout.of(reduced_needs), items, conditioning, prompt_rows)
            model = _PersonalizedRows(schedule, len(scheduler.timesteps), skipping, full, reduced, channels)
            plan = model.plan

        def combine(output, i, steps):
            off = plan is not None and plan[i] == OFF
            return _combine(layout, rules, channels, scheduler, output, i, steps, off=off)

        labels = [f"mode {item.mode!r} for seed {item.seed}" for item in items]
        # Traced steps read their predictions anyway: check those too, every step.
        check = NonFiniteCheck(labels, every=1 if trace else None, row_images=[j for _, j in rows] if trace else None,
                               dtype=self.dtype)
        traced = [TracedImages(r.images, r.pr) for r in rules if trace and r.mode.has_consistency]
        tracer = ConsistencyTrace(layout, traced, channels, personalized_rows=plan)
        x = denoise(
            model, x, scheduler, combine,
            generators=generators,
            step_kwargs=clipped_step_kwargs(scheduler) if clipped else {},
            callbacks=[check, tracer, lambda step: bar.update(1)],
        )
        images = [self._to_image(x[j : j + 1]) for j in range(len(items))]
        return list(zip(images, tracer.records()))

    def _batch_rows(self, layout: "RowLayout", items, conditioning, prompt_rows) -> _BatchRows:
        """The UNet call of one row layout of a batch (its conditioning rows, its routed forward)."""
        from dreamguide import unet_rows

        row_conditioning = conditioning.select(
            [prompt_rows[getattr(items[j], unet_rows.ROWS[need].prompt)] for need, j in layout.rows]
        )
        return _BatchRows(layout, self._row_call(layout), row_conditioning, self.dtype)

    def _row_call(self, layout: "RowLayout"):
        """The routed UNet forward for ``layout``'s rows, kept for the next batches of the same rows of
        this sampling call (a CUDA graph captured for one batch is replayed by the next of the same
        shape); with ``keep_graphs``, for later calls too."""
        from dreamguide import unet_rows

        cache = self._row_calls
        unet = self.model.unet
        routes = layout.routes(self._personalized_route)
        key = (tuple(need for need, _ in layout.rows), None if routes is None else tuple(routes))
        if self.keep_graphs:
            # A graph replays the tensors (and the LoRA scalings) it was captured with: another set of
            # weights, or other adapter settings, must not meet an old graph.
            weights = tuple(p.data_ptr() for p in unet.parameters())
            adapters = repr(sorted((getattr(unet, "peft_config", None) or {}).items()))
            key += (hash(weights), adapters, id(self.personalized_unet))
        if key in cache:
            cache[key] = cache.pop(key)  # the most recently used last
        else:
            while len(cache) >= ROW_CALLS_KEPT:
                cache.pop(next(iter(cache)))
            cache[key] = unet_rows.row_function(unet, routes, personalized_unet=self.personalized_unet, fast=self.fast)
        return cache[key]

    def forget_graphs(self) -> None:
        """Free the routed forwards (and CUDA graphs) kept between calls (``keep_graphs``); call it after
        changing the model's weights in place."""
        self._row_calls = {}

    @property
    def _personalized_route(self) -> str | None:
        """The route of personalized rows: the adapter or the personalized UNet; None: one UNet for every row."""
        if self.adapter_name is not None:
            return self.adapter_name
        if self.personalized_unet is not None:
            return PERSONALIZED_UNET_ROUTE
        return None  # learned tokens only, or no personalization

    def _check_prompt_lengths(self, items: Sequence[SampleItem]) -> None:
        """Every prompt checked against the tokenizers' length before any sampling (each text once)."""
        from dreamguide.models import check_prompt_length

        checks: dict[tuple, None] = {}
        for item in items:
            checks[(item.prompt, (item.token,) if item.token else (), "prompt")] = None
            if item.base_prompt is not None and item.base_prompt != item.prompt:
                checks[(item.base_prompt, (item.class_word,) if item.class_word else (), "base prompt")] = None
            if item.negative_prompt:
                checks[(item.negative_prompt, (), "negative prompt")] = None
        for text, needed, what in checks:
            check_prompt_length(self.model, text, needed, what)

    def _encode(self, prompts: list[str], height: int, width: int):
        from dreamguide.models import encode_prompts

        return encode_prompts(self.model, prompts, height=height, width=width)

    def _to_image(self, x) -> "Image.Image":
        """Decode one latent (or pixel) tensor to a PIL image; [-1, 1] maps to [0, 255]."""
        import torch
        from PIL import Image

        if self.model.vae is None:
            pixels = x
        else:
            vae = self._decoder()
            config = vae.config
            latents = x.to(vae.dtype)
            if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
                mean = torch.tensor(config.latents_mean, device=x.device, dtype=vae.dtype).view(1, -1, 1, 1)
                std = torch.tensor(config.latents_std, device=x.device, dtype=vae.dtype).view(1, -1, 1, 1)
                latents = latents * std / self.model.vae_scaling_factor + mean
            else:
                latents = latents / self.model.vae_scaling_factor
                if getattr(config, "shift_factor", None) is not None:
                    latents = latents + config.shift_factor
            pixels = vae.decode(latents).sample
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = array.permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def _decoder(self):
        """The VAE to decode with: a float32 copy when the VAE is float16 (the SDXL VAE overflows in fp16)."""
        import torch

        vae = self.model.vae
        if vae.dtype != torch.float16 or not (self.model.kind == "sdxl" or getattr(vae.config, "force_upcast", False)):
            return vae
        if self._float32_vae is None:
            self._float32_vae = copy.deepcopy(vae).to(torch.float32)
        return self._float32_vae



# ---------------------------------------------------------------------------------------------
# Personalized weights, saving


def load_personalized_unet(path: str | os.PathLike, model: "DiffusionModel", dtype=None, device=None):
    """A fully fine-tuned UNet from a folder (``config.json`` + safetensors, or a model folder with ``unet/``).

    Its architecture must match ``model.unet``: same input/output channels, text width and extra
    conditioning, else a ValueError names the first difference.
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    subfolder = "unet" if (path / "unet" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"personalized UNet folder {path} has no config.json (nor unet/config.json); "
            "pass the folder written by unet.save_pretrained(...)"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder=subfolder, torch_dtype=dtype or model.unet.dtype, use_safetensors=True
        )
    except OSError as error:
        raise FileNotFoundError(f"cannot load the personalized UNet from {path} (safetensors only): {error}") from error
    for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "block_out_channels"):
        ours, theirs = model.unet.config.get(key), unet.config.get(key)
        if (list(ours) if isinstance(ours, (list, tuple)) else ours) != (
            list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        ):
            raise ValueError(
                f"the personalized UNet {path} does not match the model's UNet: {key} is {theirs!r}, "
                f"the model has {ours!r}; fine-tune from the same base model"
            )
    return unet.to(device or model.unet.device).eval()


def image_filename(result: SampleResult) -> str:
    """``<mode>-seed<seed>.png``."""
    return f"{result.mode}-seed{result.seed}.png"


def grid_metadata(results: Sequence[SampleResult], modes: list[str], seeds: list[int]) -> dict:
    """A grid's PNG metadata: the settings all its images share, and its columns (modes) and rows (seeds)."""
    shared = dict(results[0].metadata)
    for result in results[1:]:
        shared = {k: v for k, v in shared.items() if result.metadata.get(k) == v}
    return {**shared, "grid_modes": list(modes), "grid_seeds": list(seeds)}


def save_results(
    results: Sequence[SampleResult],
    output: str | os.PathLike,
    settings: SampleSettings | None = None,
    sampler: Sampler | None = None,
    saved: int = 0,
) -> dict[str, list[Path]]:
    """Write the images (PNG + metadata), a labelled grid, ``settings.json`` and, if traced, ``trace.json``.

    ``saved``: the first this many results' PNGs are already in ``output`` (written by an earlier
    call as they arrived) and are not written again. Returns the paths by kind (``image``, ``grid``,
    ``trace``, ``settings``).
    """
    from dreamguide import images

    output = Path(output)
    written: dict[str, list[Path]] = {"image": [], "grid": [], "trace": [], "settings": []}
    for k, result in enumerate(results):
        path = output / image_filename(result)
        written["image"].append(path if k < saved else images.save_png(result.image, path, result.metadata))
    modes = list(dict.fromkeys(r.mode for r in results))
    seeds = list(dict.fromkeys(r.seed for r in results))
    if len(results) > 1:
        by_key = {(r.mode, r.seed): r.image for r in results}
        if all((m, s) in by_key for m in modes for s in seeds):
            rows = [[by_key[m, s] for m in modes] for s in seeds]
            grid = images.image_grid(rows, column_labels=modes, row_labels=[f"seed {s}" for s in seeds])
            written["grid"].append(images.save_png(grid, output / "grid.png", grid_metadata(results, modes, seeds)))
    if settings is not None and settings.trace:
        document = trace_document(results, written["image"])
        written["trace"].append(images.write_json(output / "trace.json", document))
    if settings is not None:
        record = {"settings": settings.to_dict(), "files": [p.name for p in written["image"]]}
        if sampler is not None:
            record["sources"] = dict(sampler.sources)
            record["model_kind"] = sampler.model.kind
        written["settings"].append(images.write_json(output / "settings.json", record))
    return written
