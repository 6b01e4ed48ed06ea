"""Files that leave the run folder: what A1111, kohya sd-scripts, ComfyUI and Civitai read from them.

The rules the tests check, and where they come from (written from memory of those files, the
A1111 class names checked against a copy of extensions-builtin/Lora/network.py):

- A1111, extensions-builtin/Lora/network.py, ``NetworkOnDisk.detect_version``: a LoRA is SDXL when
  its header's ``ss_base_model_version`` starts with ``sdxl_``, SD2 when ``ss_v2 == "True"``, else
  SD1 when it has any metadata; the LoRA page hides a network whose version differs from the loaded
  checkpoint's. ``ss_output_name`` is the name it shows, ``ss_tag_frequency`` (JSON: folder ->
  {tag: count}) the tags it lists, ``ss_training_comment`` the activation text it suggests.
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
from dreamguide.training.outputs import OutputFiles, kohya_metadata, model_version, write_outputs

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
