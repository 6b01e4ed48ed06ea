"""Sample images during training: fixed prompts and seeds in several guidance modes, so a run
shows identity vs prompt adherence as it goes (``samples/step-<step>/prompt-<i>/``)."""

from __future__ import annotations

from pathlib import Path

import torch

from dreamguide.filenames import SAMPLES_DIR
from dreamguide.lora_files import ADAPTER_NAME
from dreamguide.training.config import TrainConfig


def write_samples(config: TrainConfig, model, step: int, adapter_name: str = ADAPTER_NAME) -> list[Path]:
    """Sample every ``config.sample`` prompt x mode x seed with the current weights; return the folders."""
    from dreamguide.sampling import Sampler, SampleSettings, save_results

    s, d = config.sample, config.data
    sampler = Sampler(model, adapter_name=adapter_name, sources={"lora": f"training step {step}"})
    # The trainer parks modules it does not need on the CPU; sampling needs them all.
    parked = [m for m in (model.vae, *model.text_encoders) if m is not None and m.device != model.unet.device]
    for module in parked:
        module.to(model.unet.device)
    was_training = model.unet.training
    model.unet.eval()
    folders = []
    try:
        for i, template in enumerate(s.prompts):
            prompt = template.replace("{token}", d.token).replace("{class_word}", d.class_word)
            settings = SampleSettings(
                prompt=prompt,
                token=d.token,
                class_word=d.class_word,
                modes=tuple(s.modes),
                seeds=tuple(s.seeds),
                steps=s.steps,
                w_text=s.w_text,
                w_cons=s.w_cons,
                height=d.resolution,
                width=d.resolution,
            )
            with torch.no_grad():
                results = sampler.sample(settings, progress=False)
            folder = Path(config.output.dir) / SAMPLES_DIR / f"step-{step:06d}" / f"prompt-{i}"
            save_results(results, folder, settings, sampler)
            folders.append(folder)
    finally:
        model.unet.train(was_training)
        for module in parked:
            module.to("cpu")
    return folders
