"""Models: tiny pipelines, loading, prompt encoding, LoRA and learned-token files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamguide.lora_files import (
    add_lora,
    from_kohya,
    load_lora,
    lora_parameters,
    lora_state_dict,
    save_kohya_lora,
    save_lora,
)
from dreamguide.models import DiffusionModel, TextConditioning, detect_kind, encode_prompts, load_model, parse_dtype
from dreamguide.token_files import add_tokens, load_embeddings, save_embeddings, token_embeddings
from dreamguide.testing import COMMON_WORDS, tiny_clip_tokenizer, tiny_pixel_model, tiny_sd15_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sdxl": tiny_sdxl_pipeline, "sd": tiny_sd15_pipeline, "pixel": tiny_pixel_model}


def _model(kind: str, seed: int = 0) -> DiffusionModel:
    built = BUILDERS[kind](seed=seed)
    return built if isinstance(built, DiffusionModel) else DiffusionModel.from_pipeline(built)


def _randomize_lora(unet, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_tiny_tokenizer_tokenizes_prompts_without_unknowns():
    tokenizer = tiny_clip_tokenizer(extra_words=("zzyzx",))
    for prompt in ("a photo of a dog in the snow", "a watercolor painting of a sks dog", "a <sks> dog, Über 😀"):
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.tokenize("zzyzx dog") == ["zzyzx</w>", "dog</w>"]
    assert all(tokenizer.tokenize(word) == [word + "</w>"] for word in COMMON_WORDS)  # known words: one token


def test_tiny_models_are_deterministic_by_seed():
    a, b, c = tiny_sd15_pipeline(seed=3).unet, tiny_sd15_pipeline(seed=3).unet, tiny_sd15_pipeline(seed=4).unet
    key = "conv_in.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


@pytest.mark.parametrize("fixture, kind", [("tiny_sdxl_dir", "sdxl"), ("tiny_sd15_dir", "sd"), ("tiny_pixel_dir", "pixel")])
def test_saved_tiny_models_load_with_the_same_weights_and_outputs(request, fixture, kind):
    built = _model(kind)
    loaded = load_model(request.getfixturevalue(fixture))
    assert loaded.kind == kind == built.kind
    assert (loaded.vae is None) == (kind == "pixel")
    for a, b in zip(built.modules(), loaded.modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert type(loaded.scheduler) is type(built.scheduler)
    assert loaded.vae_scale_factor == built.vae_scale_factor and loaded.vae_scaling_factor == built.vae_scaling_factor
    assert loaded.force_zeros_for_empty_prompt == (kind == "sdxl")
    with torch.no_grad():
        prompts = ["", "a photo of a dog"]
        ca, cb = encode_prompts(built, prompts), encode_prompts(loaded, prompts)
        x = torch.randn(2, built.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(
            built.unet(x, 10, **ca.unet_kwargs()).sample, loaded.unet(x, 10, **cb.unet_kwargs()).sample, rtol=0, atol=0
        )


def test_load_model_scheduler_override(tiny_sd15_dir):
    model = load_model(tiny_sd15_dir, scheduler="euler")
    assert type(model.scheduler).__name__ == "EulerDiscreteScheduler"
    assert model.scheduler.config.beta_schedule == "scaled_linear"  # the model's own betas are kept
    from diffusers import DDPMScheduler

    assert type(load_model(tiny_sd15_dir, scheduler=DDPMScheduler).scheduler) is DDPMScheduler
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        load_model(tiny_sd15_dir, scheduler="nope")


def test_load_model_dtype_and_save_model_refuses_to_overwrite(tiny_pixel_dir, tmp_path):
    from dreamguide.models import save_model

    model = load_model(tiny_pixel_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.text_encoders[0].dtype == torch.bfloat16
    target = tmp_path / "copy"
    save_model(model, target)
    with pytest.raises(FileExistsError, match=f"{target} exists"):
        save_model(model, target)
    save_model(model.to(dtype=torch.float32), target, overwrite=True)
    assert load_model(target).dtype == torch.float32
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folders left behind


def test_kind_detection():
    assert detect_kind({"_class_name": "StableDiffusionXLPipeline"}, {"unet", "text_encoder", "text_encoder_2"}) == "sdxl"
    assert detect_kind({"_class_name": "StableDiffusionPipeline"}, {"unet", "vae", "text_encoder"}) == "sd"
    assert detect_kind({}, {"unet", "vae", "text_encoder", "text_encoder_2"}) == "sdxl"
    assert detect_kind({}, {"unet", "text_encoder", "tokenizer", "scheduler"}) == "pixel"
    with pytest.raises(ValueError, match="refiner"):
        detect_kind({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}, {"unet", "text_encoder_2"})
    with pytest.raises(ValueError, match="cannot tell the model kind"):
        detect_kind({}, {"unet"})


def test_hub_id_offline_and_missing_path_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="'someone/uncached-model' is not a folder in .* its weights are not available offline.*local"):
        load_model("someone/uncached-model")
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        load_model(missing)


def test_pickle_weights_are_refused(tmp_path, tiny_sd15_dir):
    import shutil

    folder = shutil.copytree(tiny_sd15_dir, tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"cannot load unet/ of .*only from \.safetensors"):
        load_model(folder)


def test_encode_prompts_sdxl_shapes_zeroed_empty_prompt_and_diffusers_agreement():
    pipe = tiny_sdxl_pipeline(seed=0)
    model = DiffusionModel.from_pipeline(pipe)
    with torch.no_grad():
        cond = encode_prompts(model, ["", "a dog in the snow", "a cat"], height=32, width=48)
        assert cond.prompt_embeds.shape == (3, 77, 64) and cond.pooled_prompt_embeds.shape == (3, 32)
        assert cond.add_time_ids.tolist() == [[32, 48, 0, 0, 32, 48]] * 3
        assert cond.prompt_embeds[0].abs().sum() == 0 and cond.pooled_prompt_embeds[0].abs().sum() == 0
        assert cond.prompt_embeds[1].abs().sum() > 0
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a dog in the snow", device="cpu")
    torch.testing.assert_close(cond.prompt_embeds[1:2], embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.pooled_prompt_embeds[1:2], pooled, rtol=0, atol=1e-5)
    assert negative.abs().sum() == 0 and negative_pooled.abs().sum() == 0
    # select / cat assemble batches row for row.
    joined = TextConditioning.cat([cond.select([2, 0]), cond.select(slice(1, 2))])
    for got, want in zip(joined._tensors(), cond.select([2, 0, 1])._tensors()):
        assert torch.equal(got, want)
    assert len(cond.repeat_rows(2)) == 6 and torch.equal(cond.repeat_rows(2).prompt_embeds[3], cond.prompt_embeds[1])


def test_encode_prompts_sd_matches_diffusers():
    pipe = tiny_sd15_pipeline(seed=0)
    with torch.no_grad():
        cond = encode_prompts(DiffusionModel.from_pipeline(pipe), ["", "a dog"])
        embeds, negative = pipe.encode_prompt("a dog", "cpu", 1, True)
    assert cond.pooled_prompt_embeds is None and cond.prompt_embeds.shape == (2, 77, 32)
    torch.testing.assert_close(cond.prompt_embeds, torch.cat([negative, embeds]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_lora_save_load_round_trip(tmp_path, kind):
    model = _model(kind)
    add_lora(model.unet, rank=4, alpha=8)
    _randomize_lora(model.unet)
    path = save_lora(model.unet, tmp_path / "subject.safetensors", metadata={"base_model": "tiny"})
    keys = list(load_file(path))
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    fresh = _model(kind)
    load_lora(fresh, path)
    saved, loaded = lora_state_dict(model.unet), lora_state_dict(fresh.unet)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert fresh.unet.peft_config["subject"].r == 4 and fresh.unet.peft_config["subject"].lora_alpha == 8
    cond = encode_prompts(model, ["a dog"]) if kind == "sd" else None
    if cond is not None:  # same scale (alpha / rank) too: same outputs
        with torch.no_grad():
            x = torch.randn(1, 4, 16, 16)
            torch.testing.assert_close(
                model.unet(x, 10, **cond.unet_kwargs()).sample, fresh.unet(x, 10, **cond.unet_kwargs()).sample
            )
    # diffusers reads the same file
    pipe = tiny_sdxl_pipeline(seed=0) if kind == "sdxl" else tiny_sd15_pipeline(seed=0)
    pipe.load_lora_weights(str(tmp_path), weight_name="subject.safetensors", adapter_name="subject")
    from_diffusers = lora_state_dict(pipe.unet)
    assert all(torch.equal(saved[k], from_diffusers[k]) for k in saved)


def test_kohya_lora_loads(tmp_path):
    model = _model("sd")
    add_lora(model.unet, rank=4, alpha=2)
    _randomize_lora(model.unet)
    peft_state = lora_state_dict(model.unet)
    kohya = {}
    for key, value in peft_state.items():
        module, part = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[name + (".lora_down.weight" if part.startswith("A") else ".lora_up.weight")] = value
        kohya[name + ".alpha"] = torch.tensor(2.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    fresh = _model("sd")
    load_lora(fresh, tmp_path / "kohya.safetensors")
    loaded = lora_state_dict(fresh.unet)
    assert all(torch.equal(peft_state[k], loaded[k]) for k in peft_state)
    cond = encode_prompts(model, ["a dog"])
    with torch.no_grad():
        x = torch.randn(1, 4, 16, 16)
        torch.testing.assert_close(
            model.unet(x, 10, **cond.unet_kwargs()).sample, fresh.unet(x, 10, **cond.unet_kwargs()).sample
        )


def test_lora_parameters_are_the_live_parameters_under_the_file_keys():
    model = _model("sd")
    add_lora(model.unet, rank=4)
    params = lora_parameters(model.unet)
    state = lora_state_dict(model.unet)
    assert list(params) == [f"unet.{k}" for k in state]  # same keys, same order as the saved file
    live = {id(p) for p in model.unet.parameters()}
    assert all(isinstance(p, torch.nn.Parameter) and id(p) in live for p in params.values())
    with torch.no_grad():
        next(iter(params.values())).add_(1.0)  # a step on the parameter is a step on the adapter
    assert torch.equal(next(iter(lora_state_dict(model.unet).values())), next(iter(params.values())))
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        lora_parameters(model.unet, "other")


def test_kohya_file_holds_the_adapter_with_its_alpha(tmp_path):
    model = _model("sd")
    add_lora(model.unet, rank=4, alpha=2.0)
    _randomize_lora(model.unet)
    path = save_kohya_lora(model.unet, tmp_path / "kohya.safetensors", metadata={"note": "x"})
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert (header["ss_network_dim"], header["ss_network_alpha"], header["note"]) == ("4", "2.0", "x")
    state, alphas = from_kohya(load_file(path), [name for name, _ in model.unet.named_modules()])
    expected = {f"unet.{k}": v for k, v in lora_state_dict(model.unet).items()}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert set(alphas.values()) == {2.0} and len(alphas) == len(state) // 2
    fresh = _model("sd")
    load_lora(fresh, path)  # the sampler reads it back to the same adapter
    loaded = lora_state_dict(fresh.unet)
    assert all(torch.equal(loaded[k], v) for k, v in lora_state_dict(model.unet).items())


def test_parse_dtype_names_aliases_and_auto():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("fp32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto", "cpu") is parse_dtype(None) is torch.float32
    assert parse_dtype("auto", torch.device("cuda", 0)) is parse_dtype(None, "cuda") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'; choose one of auto, float32, float16, bfloat16"):
        parse_dtype("float8")


def test_mismatched_lora_is_refused_with_key_and_shapes(tmp_path):
    sdxl = _model("sdxl")
    add_lora(sdxl.unet, rank=4)
    path = save_lora(sdxl.unet, tmp_path / "sdxl.safetensors")
    sd = _model("sd")  # cross-attention width 32, not 64
    with pytest.raises(ValueError, match=r"sdxl.safetensors does not match.*attn2.to_k.lora_A.weight.*\(4, 64\).*\(rank, 32\)"):
        load_lora(sd, path)
    state = load_file(path)
    renamed = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in state.items()}
    save_file(renamed, tmp_path / "unknown.safetensors")
    with pytest.raises(ValueError, match=r"unknown.safetensors does not match.*down_blocks.7.*no such module"):
        load_lora(sdxl, tmp_path / "unknown.safetensors", adapter_name="other")
    torch.save(state, tmp_path / "adapter.bin")
    with pytest.raises(ValueError, match="only from .safetensors"):
        load_lora(sdxl, tmp_path / "adapter.bin", adapter_name="other")


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_textual_inversion_add_save_load_round_trip(tmp_path, kind):
    model = _model(kind)
    ids = add_tokens(model, ["<sks>"], "dog")
    for tokenizer, encoder, new_ids in zip(model.tokenizers, model.text_encoders, ids):
        weight = encoder.get_input_embeddings().weight
        dog = tokenizer("dog", add_special_tokens=False).input_ids
        assert torch.equal(weight[new_ids[0]], weight[dog].mean(0))
        assert new_ids[0] in tokenizer("a <sks> dog").input_ids
    with pytest.raises(ValueError, match=r"\['<sks>'\] are already in the tokenizer"):
        add_tokens(model, ["<sks>"], "dog")
    with torch.no_grad():  # as if trained
        for encoder, new_ids in zip(model.text_encoders, ids):
            encoder.get_input_embeddings().weight[new_ids] = torch.randn(1, encoder.config.hidden_size)
    path = save_embeddings(model, ["<sks>"], tmp_path / "tokens.safetensors", {"class_word": "dog"})
    expected_keys = {"clip_l", "clip_g"} if kind == "sdxl" else {"emb_params"}
    assert set(load_file(path)) == expected_keys
    fresh = _model(kind)
    assert load_embeddings(fresh, path) == ["<sks>"]
    for a, b in zip(token_embeddings(model, "<sks>"), token_embeddings(fresh, "<sks>")):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(
            encode_prompts(model, ["a <sks> dog"]).prompt_embeds, encode_prompts(fresh, ["a <sks> dog"]).prompt_embeds
        )
    # diffusers' own loader reads the file too
    pipe = tiny_sdxl_pipeline(seed=0) if kind == "sdxl" else tiny_sd15_pipeline(seed=0)
    if kind == "sdxl":
        state = load_file(path)
        pipe.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(
            state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:
        pipe.load_textual_inversion(str(path), token="<sks>")
    for a, b in zip(token_embeddings(model, "<sks>"), token_embeddings(DiffusionModel.from_pipeline(pipe), "<sks>")):
        assert torch.equal(a, b)


def test_embeddings_formats_and_errors(tmp_path):
    model = _model("sd")
    add_tokens(model, ["<s0>", "<s1>"], "stuffed animal")  # two-token init word: mean of both
    path = save_embeddings(model, ["<s0>", "<s1>"], tmp_path / "two.safetensors")
    fresh = _model("sd")
    assert load_embeddings(fresh, path, token="<v>") == ["<v>", "<v>_1"]  # diffusers' multi-vector naming
    assert torch.equal(token_embeddings(fresh, ["<v>", "<v>_1"])[0], token_embeddings(model, ["<s0>", "<s1>"])[0])
    vector = torch.randn(32)
    save_file({"<cat-toy>": vector}, tmp_path / "learned_embeds.safetensors")  # diffusers textual_inversion.py form
    assert load_embeddings(fresh, tmp_path / "learned_embeds.safetensors") == ["<cat-toy>"]
    assert torch.equal(token_embeddings(fresh, "<cat-toy>")[0][0], vector)
    sdxl = _model("sdxl")
    with pytest.raises(ValueError, match="SDXL model needs clip_l and clip_g"):
        load_embeddings(sdxl, path)
    save_file({"emb_params": torch.randn(1, 48)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="width 48 does not fit a text encoder of width 32"):
        load_embeddings(fresh, tmp_path / "wide.safetensors", token="<w>")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["tokens"]) == ["<s0>", "<s1>"]


def test_embeddings_file_holds_the_given_vectors(tmp_path):
    """A run writes its float32 trained vectors, not the table (which may be half precision)."""
    model = _model("sdxl")
    add_tokens(model, ["<sks>"], "dog")
    vectors = [torch.randn(1, enc.config.hidden_size, dtype=torch.float32) for enc in model.text_encoders]
    path = save_embeddings(model, ["<sks>"], tmp_path / "e.safetensors", vectors=vectors)
    saved = load_file(path)
    assert torch.equal(saved["clip_l"], vectors[0]) and torch.equal(saved["clip_g"], vectors[1])
    with pytest.raises(ValueError, match="has 2 text encoder\\(s\\), got vectors for 1"):
        save_embeddings(model, ["<sks>"], tmp_path / "e.safetensors", vectors=vectors[:1])


def test_added_tokens_keep_legacy_clip_pooling_at_end_of_text():
    """Configs with eos_token_id 2 pool at argmax(ids); added tokens have larger ids, so pooling must move to EOS."""
    model = _model("sdxl")
    encoder = model.text_encoders[1]
    encoder.config.eos_token_id = encoder.text_model.eos_token_id = 2  # as in many released SDXL configs
    with torch.no_grad():
        before = encode_prompts(model, ["a dog"]).pooled_prompt_embeds
        add_tokens(model, ["<sks>"], "cat")
        after = encode_prompts(model, ["a dog"]).pooled_prompt_embeds
        personalized = encode_prompts(model, ["a <sks> dog"])
    torch.testing.assert_close(before, after, rtol=0, atol=1e-6)
    hidden = model.text_encoders[1](
        model.tokenizers[1]("a <sks> dog", padding="max_length", return_tensors="pt").input_ids
    ).last_hidden_state
    eos_position = 4  # <bos> a <sks> dog <eos>
    projected = model.text_encoders[1].text_projection(hidden[:, eos_position])
    torch.testing.assert_close(personalized.pooled_prompt_embeds, projected, rtol=0, atol=1e-6)
