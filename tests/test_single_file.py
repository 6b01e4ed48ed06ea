"""Single-file checkpoints (one ``.safetensors`` in the original A1111 / LDM key layout): tiny SD 1.5,
SD 2.x and SDXL models exported as one file load through ``load_model`` with a config folder to
the same weights and images as their diffusers folders, in every command that takes a base model
(offline, CPU)."""

from __future__ import annotations

import json
from hashlib import sha256

import numpy as np
import pytest
import torch
from PIL import Image

from dreamguide.cli import main
from dreamguide.images import read_png_metadata, read_png_parameters
from dreamguide.models import load_model
from dreamguide.sampling import SampleSettings, Sampler
from dreamguide.single_file import checkpoint_architecture
from dreamguide.testing import (
    save_model_config,
    save_single_file,
    save_tiny_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)


def _export(root, pipe, architecture=None) -> dict:
    """The pipeline as a single file, its config folder (no weights) and its diffusers folder."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "pipe": pipe,
        "file": save_single_file(pipe, root / "model.safetensors", architecture),
        "config": save_model_config(pipe, root / "config"),
        "folder": save_tiny_pipeline(pipe, root / "folder"),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny SD 1.5, SD 2.x (OpenCLIP text encoder names) and SDXL models, each exported three ways.
    SDXL's two encoders differ in width (32 and 48), as SDXL's do (768 and 1280)."""
    root = tmp_path_factory.mktemp("single-file")
    return {
        "sd15": _export(root / "sd15", tiny_sd15_pipeline(seed=0)),
        "sd2": _export(root / "sd2", tiny_sd15_pipeline(seed=4), "sd2"),
        "sdxl": _export(root / "sdxl", tiny_sdxl_pipeline(seed=0, text_encoder_2_width=48)),
    }


def _images(model, **settings):
    settings = SampleSettings(**{"prompt": "a dog in the snow", "modes": ("cfg",), "seeds": (0, 1), "steps": 2,
                                 "height": 16, "width": 16, **settings})
    return [np.asarray(r.image) for r in Sampler(model).sample(settings, progress=False)]


@pytest.mark.parametrize("name,kind,architecture", [("sd15", "sd", "sd1"), ("sd2", "sd", "sd2"),
                                                    ("sdxl", "sdxl", "sdxl")])
def test_single_file_loads_the_weights_and_samples_the_images_of_its_folder(exported, name, kind, architecture):
    case = exported[name]
    assert checkpoint_architecture(case["file"]) == architecture
    model = load_model(case["file"], config=case["config"])
    folder = load_model(case["folder"])
    assert (model.kind, model.source) == (kind, str(case["file"]))
    pipe = case["pipe"]
    originals = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    for original, loaded in zip(originals, model.modules(), strict=True):
        expected, got = original.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), type(original).__name__
        assert not loaded.training
    assert type(model.scheduler) is type(folder.scheduler) and model.scheduler.config == folder.scheduler.config
    assert [t.get_vocab() for t in model.tokenizers] == [t.get_vocab() for t in folder.tokenizers]
    assert (model.force_zeros_for_empty_prompt, model.vae_scaling_factor, model.default_size) == (
        folder.force_zeros_for_empty_prompt, folder.vae_scaling_factor, folder.default_size)
    for ours, theirs in zip(_images(model), _images(folder), strict=True):
        assert np.array_equal(ours, theirs)


def test_dtype_device_and_scheduler_apply_to_a_single_file(exported):
    case = exported["sd15"]
    model = load_model(case["file"], config=case["config"], dtype=torch.bfloat16, scheduler="euler")
    assert model.unet.dtype == model.vae.dtype == model.text_encoders[0].dtype == torch.bfloat16
    assert type(model.scheduler).__name__ == "EulerDiscreteScheduler"
    assert model.scheduler.config.beta_end == case["pipe"].scheduler.config.beta_end


def test_refused_files_and_configs_are_named_with_the_fix(exported, tmp_path, monkeypatch):
    import huggingface_hub.constants

    sd15, sdxl = exported["sd15"], exported["sdxl"]
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    for path in (pickle, tmp_path / "absent.pt", tmp_path / "weights.bin"):
        with pytest.raises(ValueError, match=rf"{path} is a pickle checkpoint \({path.suffix}\); dreamguide loads "
                                             "weights only from safetensors, never pickle"):
            load_model(path)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickle.read_bytes())
    with pytest.raises(ValueError, match=f"checkpoint file {renamed}: it is a pickle"):
        load_model(renamed)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=f"checkpoint file {missing} does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="checkpoint file model.safetensors does not exist"):
        load_model("model.safetensors")  # a file name, never a hub id
    other = tmp_path / "notes.txt"
    other.write_text("not a model")
    with pytest.raises(ValueError, match=f"{other} is a file but not a .safetensors checkpoint"):
        load_model(other)
    lora = sd15["folder"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="no Stable Diffusion UNet .* it looks like the UNet weights of a diffusers "
                                         "folder: pass the model folder instead"):
        load_model(lora)

    # Offline with no config folder and nothing in the hub cache: the file, its architecture, the fix.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for case, name, repo in ((sd15, "SD 1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                             (sdxl, "SDXL", "stabilityai/stable-diffusion-xl-base-1.0")):
        with pytest.raises(FileNotFoundError) as caught:
            load_model(case["file"])
        message = str(caught.value)
        assert message.startswith(f"{case['file']} is a single-file {name} checkpoint")
        assert f"those of {repo} are not available" in message and "--model-config" in message

    # A config folder of another architecture, or of another width.
    with pytest.raises(ValueError, match=f"{sd15['file']} is an SD 1.x checkpoint but the config folder "
                                         f"{sdxl['config']} describes an SDXL model"):
        load_model(sd15["file"], config=sdxl["config"])
    with pytest.raises(ValueError, match=f"{sdxl['file']} is an SDXL checkpoint but the config folder "
                                         f"{sd15['config']} describes an SD 1.x/2.x model"):
        load_model(sdxl["file"], config=sd15["config"])
    narrow = save_model_config(tiny_sdxl_pipeline(seed=0), tmp_path / "narrow-config")
    with pytest.raises(ValueError, match=r"does not fit the config folder .*narrow-config: its text_encoder_2 is 48 "
                                         r"wide, text_encoder_2/config.json says 32 \(hidden_size\)"):
        load_model(sdxl["file"], config=narrow)
    # SDXL encoders of one width: diffusers reads the first encoder's weights for both, the
    # projection of the second is never set; refused rather than left uninitialized.
    same_width = tiny_sdxl_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"gave no weights for 1 tensors of the text_encoder_2 .* \(e\.g\. "
                                         r"text_projection\.weight\), so they would stay unset"):
        load_model(save_single_file(same_width, tmp_path / "same-width.safetensors"),
                   config=save_model_config(same_width, tmp_path / "same-width-config"))
    with pytest.raises(FileNotFoundError, match=f"model config folder {tmp_path / 'nowhere'} does not exist"):
        load_model(sd15["file"], config=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"model config folder {tmp_path} has no model_index.json"):
        load_model(sd15["file"], config=tmp_path)
    with pytest.raises(FileNotFoundError, match="model config 'someone/uncached' is not a local folder, and as a "
                                                "hub id its config files are not available"):
        load_model(sd15["file"], config="someone/uncached")
    # A config is for files only; a variant is for folders only.
    with pytest.raises(ValueError, match=r"a model config \(.*\) is for single-file checkpoints; .* leave the model "
                                         "config out"):
        load_model(sd15["folder"], config=sd15["config"])
    with pytest.raises(ValueError, match="variant 'fp16' picks weight files of a model folder"):
        load_model(sd15["file"], config=sd15["config"], variant="fp16")


def test_the_architecture_is_read_from_the_tensor_names(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(exported["sd15"]["file"])
    for name, change, message in [
        ("refiner", lambda s: {k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.model."): v
                               for k, v in s.items()}, "is an SDXL refiner"),
        ("no-vae", lambda s: {k: v for k, v in s.items() if not k.startswith("first_stage_model.")}, "holds no VAE"),
        ("no-text", lambda s: {k: v for k, v in s.items() if not k.startswith("cond_stage_model.")},
         "holds a UNet but no text encoder"),
        ("inpainting", lambda s: {**s, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
         "its UNet takes 9 input channels"),
        ("lora", lambda s: {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4)}, "it looks like a LoRA"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(change(state), str(path))
        with pytest.raises(ValueError, match=message):
            checkpoint_architecture(path)


# ---------------------------------------------------------------------------------------------
# The commands that take a base model


def test_cli_sample_reads_a_single_file_and_names_it_by_its_hash(exported, tmp_path, capsys):
    case = exported["sdxl"]
    small = ["--prompt", "a dog in the snow", "--modes", "cfg", "--seeds", "0-1", "--steps", "2", "--height", "16",
             "--width", "16", "--no-progress"]
    assert main(["sample", "--model", str(case["file"]), "--model-config", str(case["config"]), *small,
                 "--output", str(tmp_path / "file")]) == 0
    assert main(["sample", "--model", str(case["folder"]), *small, "--output", str(tmp_path / "folder")]) == 0
    for image in ("cfg-seed0.png", "cfg-seed1.png"):
        ours, theirs = (np.asarray(Image.open(tmp_path / run / image)) for run in ("file", "folder"))
        assert np.array_equal(ours, theirs)
    digest = sha256(case["file"].read_bytes()).hexdigest()
    metadata = read_png_metadata(tmp_path / "file" / "cfg-seed0.png")
    assert (metadata["model"], metadata["model_sha256"]) == ("model.safetensors", digest)
    # A1111's "Model hash" of a checkpoint: the first 10 hex digits of the file's SHA-256
    assert f"Model hash: {digest[:10]}, Model: model.safetensors" in read_png_parameters(tmp_path / "file" / "cfg-seed0.png")
    assert str(tmp_path) not in json.dumps(metadata)
    record = json.loads((tmp_path / "file" / "settings.json").read_text())
    assert record["sources"]["model_config"] == str(case["config"])
    capsys.readouterr()
    assert main(["sample", "--model", str(case["folder"]), "--model-config", str(case["config"]), *small,
                 "--output", str(tmp_path / "wrong")]) == 2
    assert "is for single-file checkpoints" in capsys.readouterr().err


def test_train_from_a_single_file_equals_training_from_its_folder(exported, tmp_path):
    from safetensors.torch import load_file

    from dreamguide.config import ConfigError
    from dreamguide.training import train, train_config_from_dict
    from dreamguide.training.outputs import read_metadata

    case = exported["sd15"]
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photos / f"{i}.png")

    def config(out, **model):
        return train_config_from_dict({
            "model": model, "data": {"instance_dir": str(photos), "token": "sks", "class_word": "dog"},
            "train": {"steps": 2, "lr": 1e-2}, "lora": {"rank": 2}, "output": {"dir": str(out), "checkpoint_every": 0},
        })

    from_file = train(config(tmp_path / "file", pretrained=str(case["file"]), config=str(case["config"])),
                      progress=False)
    from_folder = train(config(tmp_path / "folder", pretrained=str(case["folder"])), progress=False)
    assert from_file.losses == from_folder.losses
    ours, theirs = load_file(from_file.lora_path), load_file(from_folder.lora_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    header = read_metadata(from_file.lora_path)
    assert (header["base_model"], header["base_model_sha256"]) == (
        "model.safetensors", sha256(case["file"].read_bytes()).hexdigest())
    assert header["config"]["model"] == {"pretrained": "model.safetensors", "variant": "", "config": "config"}
    with pytest.raises(ConfigError, match="model.config is for a single-file checkpoint"):
        config(tmp_path / "x", pretrained=str(case["folder"]), config=str(case["config"]))


def test_tune_and_the_app_load_a_single_file(exported, tmp_path):
    from dreamguide.evaluation.tiny_backbones import save_tiny_backbones
    from dreamguide.lora_files import add_lora, save_lora
    from dreamguide.tune import model_workbench
    from dreamguide.ui.workspace import Workspace

    case = exported["sd15"]
    model = load_model(case["folder"])
    add_lora(model.unet, rank=2, adapter_name="subject")
    lora = save_lora(model.unet, tmp_path / "lora.safetensors", "subject")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(photos / "dog.png")
    bench = model_workbench(str(case["file"]), token="sks", class_word="dog", references=photos, lora=lora,
                            backbones=save_tiny_backbones(tmp_path / "backbones"), device="cpu", dtype="float32",
                            model_config=case["config"])
    assert bench.sampler.model.source == str(case["file"])
    assert bench.source["model_config"] == str(case["config"])

    workspace = Workspace(case["file"], output=tmp_path / "ui", device="cpu", dtype="float32",
                          model_config=case["config"])
    workspace.load(lora=lora, token="sks", class_word="dog")
    assert workspace.sampler.model.source == str(case["file"])
    assert workspace.train_base(photos, tmp_path / "run")["model"] == {"pretrained": str(case["file"]),
                                                                       "config": str(case["config"])}


def test_the_app_checks_a_single_file_before_it_starts(exported, tmp_path, capsys):
    case = exported["sdxl"]
    for args, message in [
        (["--model", str(tmp_path / "model.ckpt")], "model.ckpt is a pickle checkpoint"),
        (["--model", str(case["file"]), "--model-config", str(exported["sd15"]["config"])],
         "is an SDXL checkpoint but the config folder"),
        (["--model-config", str(case["config"])], "--model-config is the config folder of a single-file --model"),
    ]:
        assert main(["ui", *args]) == 2
        assert message in capsys.readouterr().err


def test_dreambench_config_takes_a_single_file_and_its_config_folder(exported, tmp_path):
    from dreamguide.evaluation.suites.dreambench import DreamBenchWorld
    from dreamguide.evaluation.suites.dreambench_config import dreambench_config_from_dict

    case = exported["sd15"]
    data = {"dreambench": str(tmp_path), "model": {"base": str(case["file"]), "config": "config"}}
    config = dreambench_config_from_dict(data, case["config"].parent, "bench.toml")
    assert config.model.config == str(case["config"])  # relative to the config file's folder
    model = DreamBenchWorld(config)._base_model()
    assert model.source == str(case["file"]) and model.kind == "sd"
