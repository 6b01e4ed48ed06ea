"""The toy world's base model: tokenizer, architecture, save/load, the bundled weights."""

from __future__ import annotations

import json

import pytest
import torch

from dreamguide.toyworld import world
from dreamguide.toyworld.model import (
    BUNDLED_MODEL_DIR,
    SPARE_IDENTIFIERS,
    ToyModelConfig,
    _bpe,
    build_model,
    build_tokenizer,
    load_toyworld_model,
    parameter_count,
    sample_cfg,
    save_toyworld_model,
    tokenizer_words,
    vocab_and_merges,
)

TINY = ToyModelConfig(resolution=8, block_out_channels=(32, 32), attention_head_dim=8, text_hidden_size=32,
                   text_layers=1, text_heads=2, max_length=24)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_every_world_word_and_reserved_token_is_one_token(tokenizer):
    words = tokenizer_words()
    assert set(world.VOCABULARY) <= set(words)
    assert {s.token for s in world.SUBJECTS} <= set(words)
    assert set(SPARE_IDENTIFIERS) <= set(words)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_captions_tokenize_word_by_word_and_fit(tokenizer):
    from dreamguide.toyworld.render import sample_labels

    for labels in sample_labels(50, 0):
        text = world.caption(labels)
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(text.split()) + 2 <= tokenizer.model_max_length


def test_unknown_words_fall_back_to_letters_not_unk(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a xylophone", add_special_tokens=False).input_ids)
    assert tokens[0] == "a</w>"
    assert "".join(tokens[1:]) == "xylophone</w>"
    assert tokenizer.unk_token not in tokens


def test_interfering_merge_chains_are_repaired():
    # "og" alone would merge "o g</w>" first; inside "dog" that leaves (d, og</w>), which needs a repair merge
    words = ["og", "dog", "do"]
    vocab, merges = vocab_and_merges(words)
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    for word in words:
        assert _bpe(word, ranks) == [word + "</w>"]
        assert word + "</w>" in vocab


def test_bad_words_are_rejected_by_name():
    with pytest.raises(ValueError, match="two words"):
        vocab_and_merges(["two words"])
    with pytest.raises(ValueError, match="é"):
        vocab_and_merges(["café"])


def test_default_architecture_fits_the_weight_budget():
    from dreamguide.toyworld.model import build_text_encoder, build_unet

    tokenizer = build_tokenizer()
    with torch.device("meta"):
        unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    params = sum(p.numel() for m in (unet, text_encoder) for p in m.parameters())
    assert params * 2 <= 25 * 1024 * 1024  # fp16 bytes
    assert unet.config.in_channels == unet.config.out_channels == 3
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size


def test_save_load_round_trip_is_fp16_and_exact(tmp_path):
    model = build_model(TINY, seed=0)
    save_toyworld_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "PixelTextToImage"
    loaded = load_toyworld_model(tmp_path / "m")
    assert loaded.kind == "pixel" and loaded.vae is None
    for name, p in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], p.half().float()), name
    assert loaded.tokenizers[0].get_vocab() == model.tokenizers[0].get_vocab()
    assert loaded.tokenizers[0].model_max_length == TINY.max_length
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # the original model was not cast
    assert next(model.unet.parameters()).dtype == torch.float32


def test_sample_cfg_is_deterministic_per_seed_and_batch_independent():
    model = build_model(TINY, seed=0)
    model.unet.eval()
    a = sample_cfg(model, ["a red ball", "a blue cup"], [3, 4], steps=3)
    b = sample_cfg(model, ["a blue cup"], [4], steps=3)
    assert a.shape == (2, 3, 8, 8)
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=1e-5)
    assert a.abs().max() <= 1
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample_cfg(model, ["a red ball"], [1, 2])


def test_train_base_takes_steps_and_writes_its_record(tmp_path):
    from dreamguide.toyworld.train_base import BaseRecipe, train_base

    recipe = BaseRecipe(minutes=5, steps=2, batch_size=4, chunk_size=4, workers=0, warmup_steps=1, model=TINY)
    record = train_base(tmp_path / "run", recipe, device="cpu", log=lambda *_: None, preview=False)
    assert record["steps"] == 2 and record["images_seen"] == 8
    saved = json.loads((tmp_path / "run" / "training.json").read_text())
    assert saved["recipe"]["model"]["block_out_channels"] == [32, 32]
    model = load_toyworld_model(tmp_path / "run")
    assert parameter_count(model) == record["parameters"]


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "model_index.json").exists(), reason="bundled weights not built")
def test_bundled_model_loads_offline_and_samples():
    model = load_toyworld_model()
    record = json.loads((BUNDLED_MODEL_DIR / "training.json").read_text())
    assert record["weights_dtype"] == "float16" and record["steps"] > 0
    size = sum(f.stat().st_size for f in BUNDLED_MODEL_DIR.rglob("*.safetensors"))
    assert size <= 25 * 1024 * 1024
    images = sample_cfg(model, ["a photo of a red ball on the beach"], [0], steps=4)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_bundled_adapter_covers_the_default_targets_and_takes_the_fast_path():
    from dreamguide.unet_rows import fast_routing_unsupported
    from dreamguide.toyworld.personalize import DEFAULTS, load_personalized

    model, token = load_personalized()
    assert token == "sks"
    adapted = [name for name, m in model.unet.named_modules() if "subject" in getattr(m, "lora_A", {})]
    for target in DEFAULTS.lora_targets:
        assert any(name.endswith(target) for name in adapted), target
    assert fast_routing_unsupported(model.unet, ["base", "subject"]) is None


def test_cli_personalize_overrides_the_defaults_and_the_adapter_loads(tmp_path):
    from dreamguide.cli import main
    from dreamguide.toyworld.personalize import load_personalized

    assert main(["toyworld", "personalize", "--subject", "zwx", "--method", "dco", "--out", str(tmp_path / "a"),
                 "--steps", "2", "--rank", "4", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "a" / "personalization.json").read_text())
    assert record["settings"]["steps"] == 2 and record["settings"]["rank"] == 4 and record["settings"]["lr"] == 2e-3
    model, token = load_personalized("zwx", "dco", folder=tmp_path / "a")
    ranks = {m.r["subject"] for m in model.unet.modules() if "subject" in getattr(m, "lora_A", {})}
    assert token == "zwx" and ranks == {4}


def test_cli_personalize_checkpoints_resumes_and_refuses_to_overwrite(tmp_path, capsys):
    """Like `dreamguide train`: checkpoints, exact resume; an existing adapter is kept unless --overwrite."""
    from safetensors.torch import load_file

    from dreamguide.cli import main

    def run(out, *extra):
        return main(["toyworld", "personalize", "--subject", "sks", "--method", "dreambooth", "--out", str(out),
                     "--rank", "4", "--device", "cpu", "--checkpoint-every", "1", *extra])

    assert run(tmp_path / "straight", "--steps", "3") == 0
    assert run(tmp_path / "resumed", "--steps", "2") == 0
    assert run(tmp_path / "resumed", "--steps", "2") == 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert run(tmp_path / "resumed", "--steps", "3", "--resume") == 0
    straight = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert run(tmp_path / "resumed", "--steps", "1", "--overwrite") == 0
    assert [p.name for p in sorted((tmp_path / "resumed").glob("checkpoint-*"))] == ["checkpoint-1"]
    # an unfinished run (checkpoints, no adapter yet) is kept unless --overwrite
    (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").unlink()
    assert run(tmp_path / "resumed", "--steps", "2") == 2
    assert "holds checkpoints of an unfinished run; pass --resume to continue it" in capsys.readouterr().err
    assert [p.name for p in sorted((tmp_path / "resumed").glob("checkpoint-*"))] == ["checkpoint-1"]


def test_personalize_refuses_a_model_that_is_not_a_toy_world_model(tiny_sd15_dir, tmp_path):
    from dreamguide.toyworld.personalize import personalize

    with pytest.raises(ValueError, match="is a 'sd' model, not a toy-world model"):
        personalize("sks", "dreambooth", tmp_path / "a", model_path=tiny_sd15_dir, device="cpu")
