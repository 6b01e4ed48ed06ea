"""Training end to end on tiny random models (offline): methods, outputs, mixed precision, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamguide import lora_files, models, token_files
from dreamguide.training import DataError, read_metadata, train, train_config_from_dict
from dreamguide.training.checkpoints import list_checkpoints, resolve_checkpoint
from dreamguide.training.trainer import ADAPTER_NAME, adapters_disabled

TOKEN, CLASS_WORD = "<sks>", "dog"
PROMPT = f"a photo of {TOKEN} {CLASS_WORD}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models are faster on one thread than contending for two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "01.txt").write_text(f"a close up photo of {TOKEN} {CLASS_WORD} on the grass", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model_dirs(tiny_sd15_dir, tiny_sdxl_dir, tiny_pixel_dir):
    return {"sd": tiny_sd15_dir, "sdxl": tiny_sdxl_dir, "pixel": tiny_pixel_dir}


def make_config(model_dir, photos, out, method="dreambooth", **sections):
    data = {
        "model": {"pretrained": str(model_dir)},
        "data": {"instance_dir": str(photos), "token": TOKEN, "class_word": CLASS_WORD},
        "train": {"method": method, "steps": 2, "lr": 1e-2},
        "lora": {"rank": 4, "alpha": 8},
        "ti": {"lr": 1e-2},
        "output": {"dir": str(out), "checkpoint_every": 0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return train_config_from_dict(data)


def unet_prediction(model, prompt=PROMPT, seed=0):
    size = model.default_size // model.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.latent_channels, size, size, generator=g)
    with torch.no_grad():
        text = models.encode_prompts(model, [prompt])
        return model.unet(x, torch.tensor([500]), **text.unet_kwargs()).sample


def reload_personalized(model_dir, result):
    """A fresh model with the run's files loaded the way the sampler loads them."""
    model = models.load_model(model_dir)
    if result.embeddings_path is not None:
        token_files.load_embeddings(model, result.embeddings_path, TOKEN)
    lora_files.load_lora(model, result.lora_path, ADAPTER_NAME)
    return model


@pytest.mark.parametrize(
    "kind,method,ti",
    [
        ("sd", "dreambooth", False),
        ("sd", "dreambooth-ti", True),
        ("sdxl", "dreambooth-ti", True),
        ("sdxl", "dco", True),
        ("sd", "dco", False),
        ("pixel", "dco", False),
    ],
)
def test_each_method_trains_an_adapter_that_changes_the_personalized_prediction(
    kind, method, ti, model_dirs, photos, tmp_path
):
    config = make_config(model_dirs[kind], photos, tmp_path / "out", method, ti={"enabled": ti} if method == "dco" else {})
    result = train(config, progress=False)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert (result.embeddings_path is not None) == ti
    loaded = reload_personalized(model_dirs[kind], result)
    personalized = unet_prediction(loaded)
    # The files reproduce the trained model exactly as it was in memory ...
    torch.testing.assert_close(personalized, unet_prediction(result.model), rtol=1e-5, atol=1e-5)
    # ... and differ from the pretrained model on the token prompt.
    with adapters_disabled(loaded.unet):
        base = unet_prediction(loaded)
    assert (personalized - base).abs().max() > 1e-4
    if ti:
        initial = models.load_model(model_dirs[kind])
        token_files.add_tokens(initial, [TOKEN], CLASS_WORD)
        before = token_files.token_embeddings(initial, [TOKEN])
        after = token_files.token_embeddings(loaded, [TOKEN])
        assert all(not torch.allclose(a, b) for a, b in zip(after, before))
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and [r["loss"] for r in log] == result.losses


def test_reference_model_is_the_unet_with_adapters_off(model_dirs):
    model = models.load_model(model_dirs["sd"])
    before = unet_prediction(model, "a photo of dog")
    lora_files.add_lora(model.unet, 4, 4, ADAPTER_NAME)
    for name, param in model.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    assert not torch.allclose(unet_prediction(model, "a photo of dog"), before)
    with adapters_disabled(model.unet):
        torch.testing.assert_close(unet_prediction(model, "a photo of dog"), before, rtol=0, atol=0)
    lora_b = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
    assert all(p.requires_grad for p in lora_b)


def test_token_embeddings_train_under_bf16_autocast(model_dirs, photos, tmp_path):
    config = make_config(
        model_dirs["sdxl"], photos, tmp_path / "out", "dreambooth-ti", train={"mixed_precision": "bf16"},
        ti={"renormalize": True},
    )
    result = train(config, progress=False)
    initial = models.load_model(model_dirs["sdxl"])
    token_files.add_tokens(initial, [TOKEN], CLASS_WORD)
    before = token_files.token_embeddings(initial, [TOKEN])
    saved = load_file(str(result.embeddings_path))
    assert set(saved) == {"clip_l", "clip_g"}
    for key, start in zip(("clip_l", "clip_g"), before):
        assert saved[key].dtype == torch.float32 and saved[key].shape == start.shape
        assert (saved[key] - start).abs().max() > 1e-3  # trained ...
        # ... and renormalised to the initial norm (of the bf16 table it started from: bf16 rounding)
        torch.testing.assert_close(saved[key].norm(dim=-1), start.norm(dim=-1), rtol=4e-3, atol=0)
    assert all(p.dtype == torch.float32 for n, p in result.model.unet.named_parameters() if "lora_" in n)


def test_frozen_tokens_keep_their_initial_embedding(model_dirs, photos, tmp_path):
    config = make_config(model_dirs["sd"], photos, tmp_path / "out", "dreambooth-ti", ti={"train_fraction": 0.0})
    result = train(config, progress=False)
    initial = models.load_model(model_dirs["sd"])
    token_files.add_tokens(initial, [TOKEN], CLASS_WORD)
    saved = load_file(str(result.embeddings_path))
    assert set(saved) == {"emb_params"}
    assert torch.equal(saved["emb_params"], token_files.token_embeddings(initial, [TOKEN])[0])


def test_resume_is_exact(model_dirs, photos, tmp_path):
    def run(out, steps, resume=None):
        config = make_config(
            model_dirs["sd"], photos, out, "dco", ti={"enabled": True}, train={"steps": steps, "batch_size": 2},
            output={"checkpoint_every": 2, "keep_checkpoints": 1}, dco={"beta": 50.0},
        )
        return train(config, resume=resume, progress=False)

    straight = run(tmp_path / "straight", 4)
    first = run(tmp_path / "resumed", 2)
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [2]
    resumed = run(tmp_path / "resumed", 4, resume="latest")
    assert resumed.losses == straight.losses[2:] and first.losses == straight.losses[:2]
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors", "checkpoint-4/optimizer.pt"):
        a, b = tmp_path / "straight" / name, tmp_path / "resumed" / name
        if name.endswith(".pt"):
            sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert sa["param_groups"] == sb["param_groups"]
            for i in sa["state"]:
                for key in sa["state"][i]:
                    assert torch.equal(sa["state"][i][key], sb["state"][i][key]), (i, key)
        else:
            ta, tb = load_file(str(a)), load_file(str(b))
            assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [4]  # keep_checkpoints = 1
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["loss"] for r in log] == straight.losses


def test_on_step_stops_a_run_at_a_checkpoint_that_resumes_exactly(model_dirs, photos, tmp_path):
    """A stop asked by ``on_step`` after step 2 of 4 (no periodic checkpoints): the run saves
    checkpoint-2, writes no outputs, and resuming it gives the straight run's losses and files."""
    from dreamguide.training import TrainingStopped

    def config(out):
        return make_config(model_dirs["sd"], photos, out, "dreambooth-ti", train={"steps": 4})

    straight = train(config(tmp_path / "straight"), progress=False)
    seen = []

    def stop_after_two(done, loss):
        seen.append((done, loss))
        return done == 2

    with pytest.raises(TrainingStopped) as stopped:
        train(config(tmp_path / "stopped"), progress=False, on_step=stop_after_two)
    assert seen == list(zip([1, 2], straight.losses[:2]))
    assert stopped.value.step == 2 and stopped.value.checkpoint == tmp_path / "stopped" / "checkpoint-2"
    assert [step for step, _ in list_checkpoints(tmp_path / "stopped")] == [2]
    assert not (tmp_path / "stopped" / "pytorch_lora_weights.safetensors").exists()
    resumed = train(config(tmp_path / "stopped"), resume="latest", progress=False, on_step=lambda *_: False)
    assert resumed.losses == straight.losses[2:]
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "stopped" / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_latest_ignores_partial_checkpoints_and_runs_refuse_to_overwrite(model_dirs, photos, tmp_path):
    out = tmp_path / "out"
    config = make_config(model_dirs["pixel"], photos, out, output={"checkpoint_every": 1, "keep_checkpoints": 2})
    train(config, progress=False)
    assert [step for step, _ in list_checkpoints(out)] == [1, 2]
    (out / ".checkpoint-3.abc.tmp").mkdir()  # a write killed before its rename
    (out / "checkpoint-9").mkdir()  # no state.json: never completed
    assert resolve_checkpoint(out, "latest") == out / "checkpoint-2"
    expected = {"adapter.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.safetensors", "state.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == expected
    assert json.loads((out / "checkpoint-2" / "state.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume latest"):
        train(config, progress=False)


def test_output_files_keys_metadata_and_diffusers_loading(model_dirs, photos, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    config = make_config(model_dirs["sdxl"], photos, tmp_path / "out", "dco", ti={"enabled": True})
    result = train(config, progress=False)
    lora = load_file(str(result.lora_path))
    assert lora and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    assert {k.rsplit(".", 3)[-3] for k in lora} == {"to_q", "to_k", "to_v", "0"}
    kohya = load_file(str(result.kohya_path))
    assert len(kohya) == len(lora) // 2 * 3
    for key, tensor in lora.items():
        name = "lora_unet_" + key[len("unet.") : -len(".lora_A.weight")].replace(".", "_")
        part = "lora_down" if ".lora_A." in key else "lora_up"
        assert torch.equal(kohya[f"{name}.{part}.weight"], tensor) and float(kohya[f"{name}.alpha"]) == 8.0
    for path in (result.lora_path, result.kohya_path, result.embeddings_path):
        meta = read_metadata(path)
        assert (meta["token"], meta["class_word"], meta["method"], meta["steps"]) == (TOKEN, CLASS_WORD, "dco", 2)
        assert meta["base_model"] == model_dirs["sdxl"].name and meta["lora_rank"] == 4 and meta["dco_beta"] == 1000.0
    # The Kohya copy loads to the same adapter (alpha 8 != rank 4, so the scale is checked too).
    kohya_model = models.load_model(model_dirs["sdxl"])
    token_files.load_embeddings(kohya_model, result.embeddings_path, TOKEN)
    lora_files.load_lora(kohya_model, result.kohya_path, ADAPTER_NAME)
    torch.testing.assert_close(unet_prediction(kohya_model), unet_prediction(result.model), rtol=1e-5, atol=1e-5)
    # The sampler loads the files, and the adapter changes what it draws.
    from dreamguide.sampling import Sampler, SampleSettings

    settings = SampleSettings(prompt=PROMPT, token=TOKEN, class_word=CLASS_WORD, modes=("dreambooth",), steps=2)

    def draw(**files):
        sampler = Sampler.from_pretrained(model_dirs["sdxl"], token=TOKEN, dtype=torch.float32, device="cpu", **files)
        return np.asarray(sampler.sample(settings, progress=False)[0].image)

    with_lora = draw(lora=result.lora_path, embeddings=result.embeddings_path)
    assert not np.array_equal(with_lora, draw(embeddings=result.embeddings_path))
    # diffusers' own loaders rebuild the same personalized model.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dirs["sdxl"]), use_safetensors=True)
    pipe.load_lora_weights(str(result.output_dir), weight_name=result.lora_path.name)
    saved = load_file(str(result.embeddings_path))
    pipe.load_textual_inversion(saved["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(saved["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    expected = unet_prediction(result.model)
    torch.testing.assert_close(unet_prediction(models.DiffusionModel.from_pipeline(pipe)), expected, rtol=1e-5, atol=1e-5)


def test_latent_caching_checkpointing_and_samples_leave_the_training_unchanged(model_dirs, photos, tmp_path):
    def run(name, **sections):
        result = train(make_config(model_dirs["sd"], photos, tmp_path / name, **sections), progress=False)
        return result, load_file(str(result.lora_path))

    baseline, weights = run("baseline")
    # Encoding every step draws the same posterior sample as the cache; checkpointing recomputes exactly.
    other, other_weights = run("uncached", data={"cache_latents": False}, train={"gradient_checkpointing": True})
    assert other.losses == pytest.approx(baseline.losses, rel=1e-5)
    # Adam divides by the root of tiny second moments, so float rounding shows at ~1e-5 (steps are 1e-2).
    assert all(torch.allclose(other_weights[k], weights[k], atol=1e-4) for k in weights)
    # Sampling in between steps draws nothing from the training's random streams.
    sampled, sampled_weights = run("sampled", sample={"every": 1, "steps": 2, "modes": ["dreambooth", "consistency"]})
    assert sampled.losses == baseline.losses
    assert all(torch.equal(sampled_weights[k], weights[k]) for k in weights)
    for step in (1, 2):
        folder = tmp_path / "sampled" / "samples" / f"step-{step:06d}" / "prompt-0"
        assert {p.name for p in folder.glob("*.png")} == {"dreambooth-seed0.png", "consistency-seed0.png", "grid.png"}


def test_prior_preservation_adds_the_class_image_loss(model_dirs, photos, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(class_dir / f"c{i}.png")
    (class_dir / "c1.txt").write_text("a dog on the grass")

    def run(name, weight):
        config = make_config(
            model_dirs["sd"], photos, tmp_path / name, data={"class_dir": str(class_dir), "prior_loss_weight": weight}
        )
        return train(config, progress=False)

    with_prior, without = run("prior", 1.0), run("no-prior", 0.0)
    # Same instance rows at step 1; the difference is the class rows' MSE, which is positive.
    assert with_prior.losses[0] > without.losses[0] + 1e-3
    assert with_prior.losses[1] != without.losses[1]


def test_train_takes_an_in_memory_pixel_model(photos, tmp_path):
    from dreamguide.testing import tiny_pixel_model

    model = tiny_pixel_model(seed=0)
    config = train_config_from_dict(
        {"data": {"instance_dir": str(photos), "class_word": CLASS_WORD}, "train": {"steps": 2, "lr": 1e-2},
         "lora": {"rank": 2}, "output": {"dir": str(tmp_path / "out"), "checkpoint_every": 0}}
    )
    before = unet_prediction(model, "a photo of <sks> dog")
    result = train(config, model=model, progress=False)
    assert result.model is model and result.config.model.pretrained == model.source
    assert result.config.data.resolution == 16
    assert (unet_prediction(model, "a photo of <sks> dog") - before).abs().max() > 1e-4
    with adapters_disabled(model.unet):
        torch.testing.assert_close(unet_prediction(model, "a photo of <sks> dog"), before, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["empty", "corrupt", "no-token", "too-small"])
def test_bad_data_fails_before_training_and_writes_nothing(case, model_dirs, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    if case != "empty":
        Image.new("RGB", (40, 40) if case != "too-small" else (12, 12), (9, 9, 9)).save(folder / "a.png")
    if case == "corrupt":
        (folder / "b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    if case == "no-token":
        (folder / "a.txt").write_text("a photo of a dog")
    message = {"empty": "has no images", "corrupt": r"b\.jpg", "no-token": r"a\.png.*a\.txt.*token", "too-small": r"a\.png is 12x12"}
    config = make_config(model_dirs["sd"], folder, tmp_path / "out")
    with pytest.raises(DataError, match=message[case]):
        train(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_trains_and_reports_config_errors(model_dirs, photos, tmp_path, capsys):
    from dreamguide.cli import main
    from dreamguide.training import config as cfg_module

    path = tmp_path / "run.toml"
    path.write_text(
        f'[model]\npretrained = "{model_dirs["pixel"]}"\n[data]\ninstance_dir = "{photos}"\nclass_word = "dog"\n'
        f'[output]\ndir = "{tmp_path / "out"}"\ncheckpoint_every = 0\n',
        encoding="utf-8",
    )
    args = ["train", "--config", str(path), "--set", "train.steps=1", "--set", "lora.rank=2", "--no-progress"]
    assert main(args + ["--set", "data.resolution=128"]) == 2  # 40x48 photos, far smaller than 128
    assert "far smaller than the training size 128" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(args + ["--set", "data.resolution=128", "--allow-upscale"]) == 0
    saved = cfg_module.load_train_config(tmp_path / "out" / "config.toml")
    assert (saved.train.steps, saved.lora.rank, saved.data.resolution, saved.data.allow_upscale) == (1, 2, 128, True)
    assert main(["train", "--config", str(path), "--set", "lora.rnak=2"]) == 2
    assert "run.toml (with --set overrides): unknown key 'lora.rnak'; did you mean 'rank'?" in capsys.readouterr().err
    path.write_text(path.read_text() + "[train]\nsteps = 1.5\n", encoding="utf-8")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run.toml: train.steps must be an integer" in err


def test_wandb_tracker_gets_every_setting_and_the_loss_per_step(model_dirs, photos, tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    from dreamguide.training.trainer import hyperparameters

    calls = []

    class Run:
        def log(self, values, step=None, **kwargs):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    fake.config = types.SimpleNamespace(update=lambda values, **kwargs: calls.append(("config", dict(values))))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    out = tmp_path / "out"
    config = make_config(model_dirs["sd"], photos, out, "dreambooth", output={"tracker": "wandb"})
    result = train(config, progress=False)
    assert calls[0] == ("init", {"project": "dreamguide", "name": "sks", "dir": str(out)})
    kind, logged = calls[1]
    assert kind == "config" and logged == hyperparameters(result.config)
    # Every setting of the resolved config, under its dotted key; lists as text.
    assert len(logged) == sum(len(v) for v in result.config.to_dict().values()) + 1
    assert (logged["train.lr"], logged["lora.rank"], logged["lora.alpha"], logged["data.resolution"]) == (1e-2, 4, 8.0, 32)
    assert logged["lora.target_modules"] == "to_q,to_k,to_v,to_out.0" and logged["output.tracker"] == "wandb"
    steps = [(c[2], set(c[1])) for c in calls if c[0] == "log"]
    assert steps == [(1, {"loss", "lr"}), (2, {"loss", "lr"})]
    assert [c[1]["loss"] for c in calls if c[0] == "log"] == pytest.approx(result.losses)
    assert calls[-1] == ("finish",)


def test_tracker_settings_are_checked(model_dirs, photos, tmp_path, monkeypatch):
    import sys

    from dreamguide.training import ConfigError

    with pytest.raises(ConfigError, match="output.tensorboard = true contradicts output.tracker = 'wandb'"):
        make_config(model_dirs["sd"], photos, tmp_path / "a", output={"tracker": "wandb", "tensorboard": True})
    with pytest.raises(ConfigError, match="output.tracker"):
        make_config(model_dirs["sd"], photos, tmp_path / "a", output={"tracker": "mlflow"})
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    config = make_config(model_dirs["sd"], photos, tmp_path / "b", output={"tracker": "wandb"})
    with pytest.raises(ConfigError, match=r"output.tracker = 'wandb' needs wandb: pip install 'dreamguide\[wandb\]'"):
        train(config, progress=False)
    assert not (tmp_path / "b").exists()


def test_resume_refuses_a_changed_config_and_allows_cadence(model_dirs, photos, tmp_path, caplog):
    """Resume compares the resolved config with the run's: seed, lr, rank or method refused, steps allowed."""
    from dreamguide.config import ConfigError

    out = tmp_path / "run"

    def config(steps=2, **sections):
        train_ = {"steps": steps, **sections.pop("train", {})}
        return make_config(model_dirs["sd"], photos, out, "dreambooth", train=train_, output={"checkpoint_every": 1},
                           **sections)

    train(config(), progress=False)
    with pytest.raises(ConfigError) as error:
        train(config(train={"seed": 99, "lr": 0.5}), resume="latest", progress=False)
    message = str(error.value)
    assert "train.lr: 0.01 -> 0.5" in message and "train.seed: 0 -> 99" in message and "train.steps:" not in message
    with pytest.raises(ConfigError, match=r"lora\.rank: 4 -> 8"):
        train(config(lora={"rank": 8, "alpha": 8.0}), resume="latest", progress=False)
    # a run's config.toml written before a key existed (here model.config) reads that key's default
    written = (out / "config.toml").read_text()
    assert "\nconfig = " in written
    (out / "config.toml").write_text("\n".join(line for line in written.splitlines() if not line.startswith("config = ")))
    before = (out / "config.toml").read_text()
    with caplog.at_level("WARNING"):
        result = train(config(steps=3), resume="latest", progress=False)
    assert result.step == 3 and len(result.losses) == 1 and "train.steps changed from 2 to 3" in caplog.text
    assert before != (out / "config.toml").read_text()  # the run's config now says 3 steps
