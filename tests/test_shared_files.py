"""Files that leave the run folder: what A1111, kohya sd-scripts, ComfyUI and Civitai read from them.

The rules the tests check, and where they come from (written from memory of those files, the
A1111 class names checked against a copy of extensions-builtin/Lora/network.py):

- A1111, extensions-builtin/Lora/network.py, ``NetworkOnDisk.detect_version``: a LoRA is SDXL when
  its header's ``ss_base_model_version`` starts with ``sdxl_``, SD2 when ``ss_v2 == "True"``, else
  SD1 when it has any metadata; the LoRA page hides a network whose version differs from the loaded
  checkpoint's. ``ss_output_name`` is the network's alias (``NetworkOnDisk.alias``), and its
  metadata view puts ``ss_sd_model_name``, ``ss_resolution`` and ``ss_tag_frequency`` (JSON:
  folder -> {tag: count}, from which it also lists the training tags) first
  (``metadata_tags_order``); every other ``ss_`` field, ``ss_training_comment`` included, is shown as it is.
- kohya sd-scripts, train_network.py: ``ss_base_model_version`` is ``sdxl_base_v1-0`` for SDXL
  (sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0) and ``sd_v1`` / ``sd_v2`` otherwise,
  ``ss_resolution`` is a tuple written as text ``"(1024, 1024)"``, ``ss_network_dim`` /
  ``ss_network_alpha`` the rank and alpha as text.
- kohya sd-scripts, library/sai_model_spec.py: ``modelspec.sai_model_spec`` is ``"1.0.0"``,
  ``modelspec.architecture`` is the base architecture (``stable-diffusion-v1``,
  ``stable-diffusion-v2-512``, ``stable-diffusion-v2-768-v``, ``stable-diffusion-xl-v1-base``) +
  ``/lora`` for a LoRA, ``modelspec.date`` an ISO 8601 date, ``modelspec.resolution`` ``"WxH"``.
"""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dreamguide.filenames import default_run_name, run_name_error
from dreamguide.lora_files import ADAPTER_NAME, add_lora, from_kohya
from dreamguide.models import DiffusionModel
from dreamguide.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline
from dreamguide.token_files import load_embeddings, token_embeddings
from dreamguide.training import ConfigError, train_config_from_dict
from dreamguide.provenance import addnet_hash, folder_sha256, sha256_file
from dreamguide.training.outputs import OutputFiles, kohya_metadata, model_version, run_metadata, write_outputs

TOKEN, CLASS_WORD = "<zwx>", "dog"


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.metadata() or {}


def a1111_version(metadata: dict[str, str]) -> str:
    """A1111's NetworkOnDisk.detect_version, as the module docstring states it."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos") / "my dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "01.txt").write_text(f"a photo of {TOKEN} {CLASS_WORD}, grass, sunny", encoding="utf-8")
    (folder / "02.txt").write_text(f"{TOKEN} {CLASS_WORD} , grass", encoding="utf-8")
    return folder


def make_config(photos, out, **sections):
    data = {
        "model": {"pretrained": "someone/base-model"},
        "data": {"instance_dir": str(photos), "token": TOKEN, "class_word": CLASS_WORD},
        "train": {"steps": 7, "lr": 1e-3},
        "lora": {"rank": 4, "alpha": 8},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return train_config_from_dict(data)


def adapted(kind: str) -> DiffusionModel:
    model = DiffusionModel.from_pipeline((tiny_sdxl_pipeline if kind == "sdxl" else tiny_sd15_pipeline)(seed=0))
    add_lora(model.unet, rank=4, alpha=8)
    return model


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_kohya_file_carries_the_training_fields_a1111_and_kohya_read(kind, photos, tmp_path):
    model = adapted(kind)
    config = make_config(photos, tmp_path / "run")
    files = OutputFiles.in_folder(tmp_path / "run", with_embeddings=False, name="my-run")
    assert files.kohya == tmp_path / "run" / "my-run.safetensors"
    when = 1_700_000_000
    write_outputs(files, model, [], {"token": TOKEN}, TOKEN, kohya_metadata(config, model, 5, "my-run", when))
    meta = header(files.kohya)
    assert a1111_version(meta) == ("SDXL" if kind == "sdxl" else "SD1")
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if kind == "sdxl" else "sd_v1")
    arch = "stable-diffusion-xl-v1-base" if kind == "sdxl" else "stable-diffusion-v1"
    size = model.default_size
    assert {k: meta[k] for k in meta if k not in ("dreamguide", "format")} == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8",
        "ss_base_model_version": meta["ss_base_model_version"],
        "ss_sd_model_name": "someone/base-model",
        "sshs_model_hash": addnet_hash(files.kohya),
        "ss_v2": "False",
        "ss_output_name": "my-run",
        "ss_training_comment": f"trigger: {TOKEN}",
        "ss_resolution": f"({size}, {size})",
        "ss_max_train_steps": "7",
        "ss_steps": "5",
        "ss_learning_rate": "0.001",
        "ss_seed": str(config.train.seed),
        "ss_training_finished_at": str(when),
        "ss_tag_frequency": meta["ss_tag_frequency"],
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my-run",
        "modelspec.trigger_phrase": TOKEN,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": "2023-11-14T22:13:20+00:00",
    }
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).timestamp() == when
    # Tags: the comma-separated parts of each caption; 00.png has no .txt: the instance prompt.
    assert json.loads(meta["ss_tag_frequency"]) == {
        "my dog": {f"a photo of {TOKEN} {CLASS_WORD}": 2, "grass": 2, "sunny": 1, f"{TOKEN} {CLASS_WORD}": 1}
    }
    # The weights and alpha are those of the adapter, unchanged by the extra fields.
    state, alphas = from_kohya(load_file(files.kohya), [name for name, _ in model.unet.named_modules()])
    assert set(alphas.values()) == {8.0} and len(state) == 2 * len(alphas)
    # The diffusers file does not take the kohya fields.
    assert not any(k.startswith(("ss_", "modelspec.")) for k in header(files.lora))


def test_model_version_tells_sd2_by_its_text_width_and_prediction():
    model = adapted("sd")
    assert model_version(model) == ("sd_v1", "stable-diffusion-v1")
    model.unet.register_to_config(cross_attention_dim=1024)
    assert model_version(model) == ("sd_v2", "stable-diffusion-v2-512")
    model.scheduler.register_to_config(prediction_type="v_prediction")
    assert model_version(model) == ("sd_v2", "stable-diffusion-v2-768-v")
    assert a1111_version({"ss_base_model_version": "sd_v2", "ss_v2": "True"}) == "SD2"


def test_run_name_defaults_to_the_token_then_the_folder_and_bad_names_are_refused(photos, tmp_path):
    assert default_run_name("<sks>", "outputs/run") == "sks"
    assert default_run_name("zwx", "outputs/run") == "zwx"
    assert default_run_name("<my token*>", "outputs/run") == "my_token"
    assert default_run_name("<>", "outputs/dog run") == "dog_run"
    assert default_run_name("<>", "/") == "run"
    # A token whose name would overwrite the diffusers file falls back to the folder.
    assert default_run_name("<pytorch_lora_weights>", "out/rex") == "rex"
    assert make_config(photos, tmp_path / "out").run_name == "zwx"
    assert make_config(photos, tmp_path / "out", output={"name": "rex-v2"}).run_name == "rex-v2"
    for bad, why in [("a/b", "not a portable file name"), ("-x", "not a portable file name"),
                     ("embeddings", "would overwrite the run's embeddings.safetensors"),
                     ("pytorch_lora_weights", "would overwrite the run's pytorch_lora_weights.safetensors")]:
        assert why in run_name_error(bad)
        with pytest.raises(ConfigError, match=f"output.name is {bad!r} .*{why}"):
            make_config(photos, tmp_path / "out", output={"name": bad})


def test_shared_files_are_named_after_the_run_and_the_diffusers_files_keep_their_names(photos, tmp_path):
    model = adapted("sd")
    config = make_config(photos, tmp_path / "run", train={"method": "dreambooth-ti"})
    files = OutputFiles.in_folder(tmp_path / "run", with_embeddings=True, name=config.run_name)
    from dreamguide.token_files import add_tokens

    add_tokens(model, TOKEN, CLASS_WORD)
    vectors = [token_embeddings(model, [TOKEN])[0] + 1.0]
    write_outputs(files, model, vectors, {"token": TOKEN}, TOKEN, kohya_metadata(config, model, 7, config.run_name))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["embeddings.safetensors", "pytorch_lora_weights.safetensors", "zwx.safetensors", "zwx_emb.safetensors"]
    shared, own = load_file(files.shared_embeddings), load_file(files.embeddings)
    assert shared.keys() == own.keys() == {"emb_params"} and torch.equal(shared["emb_params"], own["emb_params"])
    # A1111 (modules/textual_inversion/textual_inversion.py, from memory) takes a safetensors dict of
    # exactly one tensor as the embedding and names it after the file: the trigger is "zwx_emb".
    assert len(shared) == 1 and files.shared_embeddings.stem == "zwx_emb"
    fresh = adapted("sd")
    assert load_embeddings(fresh, files.shared_embeddings, "zwx_emb") == ["zwx_emb"]
    torch.testing.assert_close(token_embeddings(fresh, ["zwx_emb"])[0], vectors[0])


def test_shared_headers_name_sources_by_hub_id_or_base_name_and_hash(photos, tmp_path, tiny_sd15_dir):
    model = adapted("sd")
    out = tmp_path / "deep" / "run"
    config = make_config(photos, out, model={"pretrained": str(tiny_sd15_dir)}, data={"class_dir": str(photos)})
    meta = run_metadata(config, model, 3)
    text = json.dumps(meta)
    for local in (str(tmp_path), str(tiny_sd15_dir.parent), str(photos.parent)):
        assert local not in text
    unet_weights = tiny_sd15_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert (meta["base_model"], meta["base_model_sha256"]) == (tiny_sd15_dir.name, sha256_file(unet_weights))
    assert meta["config"]["model"]["pretrained"] == tiny_sd15_dir.name
    assert (meta["config"]["data"]["instance_dir"], meta["config"]["data"]["class_dir"]) == ("my dog", "my dog")
    assert meta["config"]["output"]["dir"] == "run" and meta["name"] == "zwx"
    # The image folder's hash: each file's name and SHA-256, so the same photos elsewhere hash the same.
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in photos.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert meta["instance_data_sha256"] == folder_sha256(copy)
    (copy / "01.txt").write_text("another caption <zwx>", encoding="utf-8")
    assert folder_sha256(copy) != meta["instance_data_sha256"]
    # A Hub id stays as it is; the config written beside the outputs (not shared) keeps the paths.
    hub_meta = run_metadata(make_config(photos, out), model, 3)
    assert (hub_meta["base_model"], hub_meta["base_model_sha256"]) == ("someone/base-model", None)
    assert config.data.instance_dir == str(photos)


# Every kind of layer lora.target_modules can name in an SD / SDXL UNet (PEFT matches a target by
# the end of a module's name): attention, transformer, resnet, sampling, embedding and in/out layers.
MODULE_FAMILIES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
    "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2",
    "conv_in", "conv_out",
]


def prediction(model, seed=0):
    from dreamguide.models import encode_prompts

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), **encode_prompts(model, ["a dog"]).unet_kwargs()).sample


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_every_module_family_round_trips_through_the_kohya_file(kind, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    from dreamguide.lora_files import KOHYA_NATIVE_NAMES, load_lora, lora_state_dict, save_kohya_lora

    model = DiffusionModel.from_pipeline((tiny_sdxl_pipeline if kind == "sdxl" else tiny_sd15_pipeline)(seed=0))
    add_lora(model.unet, rank=2, alpha=3, target_modules=MODULE_FAMILIES)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    saved = lora_state_dict(model.unet)
    modules = sorted({key.rsplit(".", 2)[0] for key in saved})
    families = {f for f in MODULE_FAMILIES if any(m == f or m.endswith("." + f) for m in modules)}
    assert families == set(MODULE_FAMILIES) - ({"add_embedding.linear_1", "add_embedding.linear_2"} if kind == "sd" else set())
    path = save_kohya_lora(model.unet, tmp_path / "all.safetensors")
    kohya = load_file(path)
    assert len(kohya) == 3 * len(modules)
    if kind == "sdxl":  # kohya's own names for SDXL's added-conditioning MLP
        assert {f"lora_unet_{n}.alpha" for n in KOHYA_NATIVE_NAMES.values()} <= kohya.keys()
    # Our reader.
    state, alphas = from_kohya(kohya, [name for name, _ in model.unet.named_modules()])
    assert sorted(alphas) == modules and set(alphas.values()) == {3.0}
    assert all(torch.equal(state[f"unet.{k}"], v) for k, v in saved.items()) and len(state) == len(saved)
    # diffusers' Kohya converter names every module back, none dropped or renamed.
    converted, converted_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert all(k.startswith("unet.") for k in converted) and len(converted_alphas) == len(modules)
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()})
    assert sorted({k.rsplit(".", 2)[0] for k in peft}) == modules
    assert all(torch.equal(peft[k], v) for k, v in saved.items())
    # diffusers' loaders (dreamguide's load_lora reads through them) rebuild the same model.
    expected = prediction(model)
    fresh = DiffusionModel.from_pipeline((tiny_sdxl_pipeline if kind == "sdxl" else tiny_sd15_pipeline)(seed=0))
    load_lora(fresh, path)
    torch.testing.assert_close(prediction(fresh), expected, rtol=1e-5, atol=1e-5)
    pipe = (tiny_sdxl_pipeline if kind == "sdxl" else tiny_sd15_pipeline)(seed=0)
    pipe.load_lora_weights(str(tmp_path), weight_name="all.safetensors")
    torch.testing.assert_close(prediction(DiffusionModel.from_pipeline(pipe)), expected, rtol=1e-5, atol=1e-5)
