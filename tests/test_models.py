"""Models: tiny pipelines, loading, prompt encoding, LoRA and learned-token files."""

from __future__ import annotations

import pytest
import torch

from dreamguide.models import DiffusionModel, load_model
from dreamguide.testing import tiny_clip_tokenizer, tiny_pixel_model, tiny_sd15_pipeline, tiny_sdxl_pipeline


def test_tiny_tokenizer_tokenizes_prompts_without_unknowns():
    tokenizer = tiny_clip_tokenizer(extra_words=("zzyzx",))
    for prompt in ("a photo of a dog in the snow", "a watercolor painting of a sks dog", "a <sks> dog, Über 😀"):
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.tokenize("zzyzx dog") == ["zzyzx</w>", "dog</w>"]


@pytest.mark.parametrize("fixture, kind", [("tiny_sdxl_dir", "sdxl"), ("tiny_sd15_dir", "sd"), ("tiny_pixel_dir", "pixel")])
def test_saved_tiny_models_load_with_the_same_weights(request, fixture, kind):
    built = {"sdxl": tiny_sdxl_pipeline, "sd": tiny_sd15_pipeline, "pixel": tiny_pixel_model}[kind](seed=0)
    built = built if isinstance(built, DiffusionModel) else DiffusionModel.from_pipeline(built)
    loaded = load_model(request.getfixturevalue(fixture))
    assert loaded.kind == kind == built.kind
    for a, b in zip(built.modules(), loaded.modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert type(loaded.scheduler) is type(built.scheduler)
    assert loaded.vae_scale_factor == built.vae_scale_factor
