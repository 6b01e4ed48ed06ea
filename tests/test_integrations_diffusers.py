"""ConsistencyGuidance in diffusers' modular SDXL pipeline gives dreamguide's Sampler's images (tiny SDXL, offline)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dreamguide.sampling import SampleSettings

TOKEN_KW = dict(prompt="a sks dog in the snow", token="sks", class_word="dog")
SIZE = dict(height=16, width=24)
STEPS = 3


@pytest.fixture(scope="module")
def model_and_pipe():
    """A tiny SDXL DiffusionModel with a random LoRA "subject", and a modular SDXL pipeline on the same components."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    model = DiffusionModel.from_pipeline(pipe)
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if k in modular._component_specs})
    return model, modular


def guided_images(modular, guider, settings: SampleSettings) -> list[np.ndarray]:
    """The pipeline's images for ``settings`` (its prompt is the base prompt; one generator per seed)."""
    guider.set_token_prompt(modular, settings.prompt)
    modular.update_components(guider=guider)
    images = modular(
        prompt=settings.base_prompt,
        num_inference_steps=settings.steps,
        num_images_per_prompt=len(settings.seeds),
        generator=[torch.Generator().manual_seed(seed) for seed in settings.seeds],
        output="images",
        **SIZE,
    )
    return [np.asarray(image).astype(np.int16) for image in images]


def sampler_images(model, settings: SampleSettings) -> list[np.ndarray]:
    from dreamguide.sampling import Sampler

    results = Sampler(model, adapter_name="subject").sample(settings, progress=False)
    return [np.asarray(r.image).astype(np.int16) for r in results]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("mode", ["consistency", "parallel-rescaled"])
def test_guider_gives_the_samplers_images(model_and_pipe, mode):
    from dreamguide.integrations.diffusers import ConsistencyGuidance
    from dreamguide.unet_rows import lora_layers

    model, modular = model_and_pipe
    settings = SampleSettings(**TOKEN_KW, modes=mode, seeds=(0, 1), steps=STEPS, batch_size=2, **SIZE)
    ours = sampler_images(model, settings)
    theirs = guided_images(modular, ConsistencyGuidance(mode=mode, adapter_name="subject"), settings)
    assert [max_diff(a, b) for a, b in zip(ours, theirs)] == [0, 0]
    assert max_diff(theirs[0], theirs[1]) > 50  # one generator per image
    # The three predictions matter: the base model's cfg image is far from it.
    cfg = sampler_images(model, replace(settings, modes=("cfg",)))
    assert max_diff(cfg[0], theirs[0]) > 10
    # prepare_models' routing hooks are gone after the run: the UNet is as it was.
    assert all(not layer._forward_pre_hooks for layer in lora_layers(model.unet))


def test_lora_loaded_by_diffusers_gives_the_same_images(model_and_pipe, tmp_path):
    """The documented path: dreamguide's LoRA file loaded with the pipeline's own load_lora_weights."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from dreamguide.integrations.diffusers import ConsistencyGuidance
    from dreamguide.lora_files import save_lora
    from dreamguide.testing import tiny_sdxl_pipeline

    model, _ = model_and_pipe
    save_lora(model.unet, tmp_path / "pytorch_lora_weights.safetensors", "subject")
    pipe = tiny_sdxl_pipeline(seed=0)
    fresh = StableDiffusionXLAutoBlocks().init_pipeline()
    fresh.update_components(**{k: v for k, v in pipe.components.items() if k in fresh._component_specs})
    fresh.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="subject")
    settings = SampleSettings(**TOKEN_KW, modes="pr", seeds=(5,), steps=STEPS, **SIZE)
    theirs = guided_images(fresh, ConsistencyGuidance(mode="pr", adapter_name="subject"), settings)
    assert max_diff(sampler_images(model, settings)[0], theirs[0]) == 0


def test_modes_differ_and_pr_options_reach_the_math(model_and_pipe):
    from dreamguide.integrations.diffusers import ConsistencyGuidance

    model, modular = model_and_pipe
    settings = SampleSettings(**TOKEN_KW, modes="consistency", seeds=(0,), steps=STEPS, **SIZE)
    consistency = guided_images(modular, ConsistencyGuidance(mode="consistency"), settings)[0]
    pr = guided_images(modular, ConsistencyGuidance(mode="pr"), settings)[0]
    assert max_diff(consistency, pr) > 0
    # normalization "none" turns PR into plain consistency guidance exactly (SPEC section 3)
    pr_none = guided_images(modular, ConsistencyGuidance(mode="pr", pr={"normalization": "none"}), settings)[0]
    assert max_diff(consistency, pr_none) == 0


def test_off_the_guider_steps_with_the_personalized_prediction(model_and_pipe):
    """Outside the window: the personalized prediction alone = dreambooth sampling at w_text 1 (f_u + (e_ft - f_u))."""
    from dreamguide.integrations.diffusers import ConsistencyGuidance

    model, modular = model_and_pipe
    settings = SampleSettings(**TOKEN_KW, modes="dreambooth", w_text=1.0, seeds=(3,), steps=STEPS, **SIZE)
    off = guided_images(modular, ConsistencyGuidance(stop=0.0), settings)[0]
    assert max_diff(sampler_images(model, settings)[0], off) == 0
    # enabled=False: the SDXL denoise loop enables the guider again after the negative prompt was skipped
    with pytest.raises(ValueError, match=r"no negative prompt embeddings.*use stop=0.0 instead of enabled=False"):
        guided_images(modular, ConsistencyGuidance(enabled=False), settings)


def test_window_counts_steps_as_diffusers_guiders_do():
    from dreamguide.integrations.diffusers import ConsistencyGuidance

    guider = ConsistencyGuidance(start=0.2, stop=0.6)
    assert guider.num_conditions == 3  # before the loop: the text encoder step prepares the negative prompt
    counts = []
    for step in range(10):
        guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(999 - 100 * step))
        counts.append(guider.num_conditions)
    assert counts == [1, 1, 3, 3, 3, 3, 1, 1, 1, 1]


def test_config_roundtrip_and_errors(tmp_path, model_and_pipe):
    from dreamguide.guidance import ParallelRescaling
    from dreamguide.integrations.diffusers import ConsistencyGuidance

    guider = ConsistencyGuidance(mode="pr", w_cons=2.0, pr=ParallelRescaling(rescale=0.5))
    assert guider.config.mode == "parallel-rescaled" and guider.config.pr["rescale"] == 0.5
    guider.save_pretrained(tmp_path)
    loaded = ConsistencyGuidance.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(guider.config) and loaded.pr == guider.pr and loaded.w_cons == 2.0
    assert guider.new(w_cons=0.0).w_cons == 0.0

    with pytest.raises(ValueError, match=r"3-prediction modes consistency, parallel-rescaled, orthogonal, .*; 'cfg' is not one"):
        ConsistencyGuidance(mode="cfg")
    with pytest.raises(ValueError, match=r"unknown parallel-rescaling setting\(s\) \['lam'\]"):
        ConsistencyGuidance(pr={"lam": 2.0})
    with pytest.raises(ValueError, match=r"w_cons must be a finite number, got nan"):
        ConsistencyGuidance(w_cons=float("nan"))

    with pytest.raises(ValueError, match=r"inputs \['prompt_embeds', 'text_embeds'\]; \['prompt_embeds', 'text_embeds'\] "
                                         r"are not among \['encoder_hidden_states'\]"):
        guider.prepare_inputs({"encoder_hidden_states": (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))})

    model, modular = model_and_pipe
    settings = SampleSettings(**TOKEN_KW, modes="consistency", seeds=(0,), steps=1, **SIZE)
    modular.update_components(guider=ConsistencyGuidance())
    with pytest.raises(ValueError, match=r"no token prompt; call guider.set_token_prompt\(pipe, "):
        modular(prompt=settings.base_prompt, num_inference_steps=1, output="images", **SIZE)
    with pytest.raises(ValueError, match=r"carries LoRA adapter\(s\) \['subject'\].*pass adapter_name='subject'"):
        guided_images(modular, ConsistencyGuidance(adapter_name=None), settings)
    two = ConsistencyGuidance()
    two.set_token_prompt(modular, ["a sks dog", "a sks dog in the snow"])
    modular.update_components(guider=two)
    with pytest.raises(ValueError, match=r"2 token prompt\(s\) for 3 pipeline rows"):
        modular(prompt=settings.base_prompt, num_images_per_prompt=3, num_inference_steps=1, output="images", **SIZE)


@pytest.mark.parametrize("found", ["0.41.2", "0.43.0", "1.0.0", "dev"])
def test_other_diffusers_versions_are_refused_with_the_fix(found):
    from dreamguide.integrations.diffusers import check_diffusers_version

    with pytest.raises(ImportError, match=rf"needs diffusers>=0\.42,<0\.43, found {found}.*install 'diffusers>=0\.42"):
        check_diffusers_version(found)
    check_diffusers_version("0.42.1")
    check_diffusers_version("0.42.0.dev0")
