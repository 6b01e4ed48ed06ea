"""Training config, data preparation, losses and the Kohya conversion (no diffusion model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dreamguide.training import config as cfg
from dreamguide.training import data as dt
from dreamguide.training.losses import dco_loss, mse_loss, prediction_target
from dreamguide.lora_files import from_kohya, to_kohya

MINIMAL = """
[model]
pretrained = "some/model"
[data]
instance_dir = "photos"
class_word = "dog"
"""


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Config


def test_config_defaults_follow_the_spec(tmp_path):
    config = cfg.load_train_config(write(tmp_path / "run.toml", MINIMAL))
    assert (config.lora.rank, config.lora.alpha, config.train.lr, config.ti.lr) == (32, 32.0, 5e-5, 5e-6)
    assert (config.train.steps, config.train.batch_size, config.dco.beta) == (1000, 1, 1000.0)
    assert config.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config.train.lr_scheduler == "constant" and config.dco.average == "batch"


def test_sample_section_guides_as_the_sampler_does(tmp_path):
    from dreamguide.sampling import SampleSettings

    sampler = SampleSettings(prompt="a photo of <sks> dog", token="<sks>", class_word="dog")
    sample = cfg.load_train_config(write(tmp_path / "run.toml", MINIMAL)).sample
    assert (sample.w_text, sample.w_cons) == (sampler.w_text, sampler.w_cons)
    assert sample.modes == ["dreambooth", *sampler.modes]


def test_saved_config_reads_back_equal(tmp_path):
    config = cfg.load_train_config(
        write(tmp_path / "run.toml", MINIMAL),
        ["train.method=dco", "ti.enabled=true", 'data.instance_prompt="a \\"q\\" {token}"', "dco.beta=0.5"],
    )
    cfg.save_config(config, tmp_path / "out" / "config.toml")
    assert cfg.load_train_config(tmp_path / "out" / "config.toml") == config


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "run.toml", MINIMAL + "\n[train]\nstepz = 3\n")
    with pytest.raises(cfg.ConfigError, match=r"run\.toml.*'train\.stepz'.*did you mean 'steps'"):
        cfg.load_train_config(path)
    with pytest.raises(cfg.ConfigError, match=r"run\.toml.*unknown key 'trian'"):
        cfg.load_train_config(write(tmp_path / "run.toml", MINIMAL + "\n[trian]\nsteps = 3\n"))


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path / "run.toml", MINIMAL + '\n[train]\nsteps = "many"\n')
    with pytest.raises(cfg.ConfigError, match=r"run\.toml: train\.steps must be an integer, got 'many'"):
        cfg.load_train_config(path)
    path = write(tmp_path / "run.toml", MINIMAL + '\n[train]\nmethod = "lora"\n')
    with pytest.raises(cfg.ConfigError, match=r"train\.method must be one of 'dreambooth'"):
        cfg.load_train_config(path)
    with pytest.raises(cfg.ConfigError, match=r"lora\.target_modules\[1\] must be a string"):
        cfg.load_train_config(write(tmp_path / "run.toml", MINIMAL + "\n[lora]\ntarget_modules = ['to_q', 3]\n"))


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path / "run.toml", MINIMAL)
    config = cfg.load_train_config(path, ["train.steps=7", "data.token=<sks>", "lora.alpha=8", "data.class_word=true"])
    assert config.train.steps == 7 and config.data.token == "<sks>" and config.lora.alpha == 8.0
    assert config.data.class_word == "true"
    with pytest.raises(cfg.ConfigError, match=r"with --set overrides.*train\.steps must be an integer"):
        cfg.load_train_config(path, ["train.steps=1.5"])
    with pytest.raises(cfg.ConfigError, match="section.key=value"):
        cfg.load_train_config(path, ["steps"])


def test_validation_names_the_key(tmp_path):
    path = write(tmp_path / "run.toml", MINIMAL)
    with pytest.raises(cfg.ConfigError, match=r"run\.toml.*model\.pretrained is required"):
        cfg.load_train_config(path, ["model.pretrained=''"])
    with pytest.raises(cfg.ConfigError, match="ti.enabled.*dreambooth-ti"):
        cfg.load_train_config(path, ["ti.enabled=true"])
    with pytest.raises(cfg.ConfigError, match="data.class_dir"):
        cfg.load_train_config(path, ["train.method=dco", "data.class_dir=cls"])
    with pytest.raises(cfg.ConfigError, match="ti.train_fraction"):
        cfg.load_train_config(path, ["ti.train_fraction=1.5"])
    with pytest.raises(cfg.ConfigError, match="data.resolution"):
        cfg.load_train_config(path, ["data.resolution=30"])
    with pytest.raises(cfg.ConfigError, match="sample.prompts.*'a dog' without the token"):
        cfg.load_train_config(path, ["sample.every=10", "sample.prompts=['a {token} dog', 'a dog']"])
    with pytest.raises(cfg.ConfigError, match="sample.modes.*'prr'"):
        cfg.load_train_config(path, ["sample.every=10", "sample.modes=['cfg', 'prr']"])


# ---------------------------------------------------------------------------------------------
# Data


def save_image(path, size=(48, 40), mode="RGB", color=(200, 30, 30), **kwargs):
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def test_captions_template_and_base_captions(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.jpg")
    write(tmp_path / "b.txt", "a <sks> dog  on the\nbeach")
    (tmp_path / "notes.md").write_text("ignored")
    entries = dt.scan_instance_folder(tmp_path, "<sks>", "dog", "a photo of {token} {class_word}")
    assert [(e.path.name, e.token_caption, e.base_caption) for e in entries] == [
        ("a.png", "a photo of <sks> dog", "a photo of dog"),
        ("b.jpg", "a <sks> dog on the beach", "a dog on the beach"),
    ]


def test_exif_orientation_modes_and_aspect_crop(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 40 wide x 20 high, shown 20 wide x 40 high
    save_image(tmp_path / "rotated.jpg", size=(40, 20), exif=exif.tobytes())
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    save_image(tmp_path / "gray.png", mode="L", color=128)
    save_image(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 0, 0, 0))
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    halves = np.zeros((20, 40, 3), dtype=np.uint8)
    halves[:, :10] = (255, 0, 0)
    halves[:, 10:30] = (0, 255, 0)
    halves[:, 30:] = (0, 0, 255)
    Image.fromarray(halves).save(tmp_path / "wide.png")
    entries = dt.scan_instance_folder(tmp_path, "sks", "dog", "sks dog")
    images = {img.path.name: img for img in dt.load_images(entries, size=16)}
    assert images["rotated.jpg"].original_size == (40, 20)  # (height, width) after EXIF rotation
    assert images["rotated.jpg"].crop_top_left == (8, 0)
    for name in ("clear.png", "gray.png", "cmyk.jpg", "deep.png"):
        assert images[name].pixels.shape == (3, 16, 16) and images[name].pixels.dtype == torch.float32
    assert torch.allclose(images["clear.png"].pixels, torch.ones(3, 16, 16))  # transparency on white
    assert torch.allclose(images["deep.png"].pixels, torch.ones(3, 16, 16))  # 16-bit white
    assert torch.allclose(images["gray.png"].pixels, torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    wide = images["wide.png"]
    assert wide.original_size == (20, 40) and wide.crop_top_left == (0, 8)  # 32x16 resized, centre crop
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None]
    assert torch.allclose(wide.pixels[:, 8, 3:13], green.expand(3, 10), atol=0.05)


def test_bad_data_errors_name_the_file(tmp_path):
    with pytest.raises(dt.DataError, match=r"instance image folder .*empty.* has no images"):
        (tmp_path / "empty").mkdir()
        dt.scan_instance_folder(tmp_path / "empty", "sks", "dog", "sks dog")
    folder = tmp_path / "photos"
    folder.mkdir()
    save_image(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    entries = dt.scan_instance_folder(folder, "sks", "dog", "a sks dog")
    with pytest.raises(dt.DataError, match=r"cannot read image .*broken\.png"):
        dt.check_images_readable(entries)
    (folder / "broken.png").unlink()
    write(folder / "ok.txt", "a photo of a dog")
    with pytest.raises(dt.DataError, match=r"caption of .*ok\.png \(.*ok\.txt\) does not contain the token 'sks'"):
        dt.scan_instance_folder(folder, "sks", "dog", "a sks dog")
    write(folder / "ok.txt", "asks dog")  # a token must be a whole word
    with pytest.raises(dt.DataError, match="does not contain the token"):
        dt.scan_instance_folder(folder, "sks", "dog", "a sks dog")
    (folder / "ok.txt").unlink()
    entries = dt.scan_instance_folder(folder, "sks", "dog", "a sks dog")
    with pytest.raises(dt.DataError, match=r"ok\.png is 48x40, far smaller than the training size 96.*allow_upscale"):
        dt.load_images(entries, size=96)
    assert dt.load_images(entries, size=96, allow_upscale=True)[0].pixels.shape == (3, 96, 96)


# ---------------------------------------------------------------------------------------------
# Losses


def fixed_tensors():
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 5)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def independent_dco(pred, ref, target, beta, average):
    """Plain-Python DCO: squared errors summed element by element, softplus written out."""
    n, per = pred.shape[0], pred[0].numel()
    sq = lambda a: [sum(float(v) ** 2 for v in (a[i] - target[i]).flatten()) / per for i in range(n)]  # noqa: E731
    ft, rf = sq(pred), sq(ref)
    softplus = lambda x: math.log1p(math.exp(-abs(x))) + max(x, 0.0)  # noqa: E731  -log sigmoid(-x)
    if average == "batch":
        return softplus(beta * (sum(ft) / n - sum(rf) / n))
    return sum(softplus(beta * (f - r)) for f, r in zip(ft, rf)) / n


@pytest.mark.parametrize("average", ["batch", "sample"])
@pytest.mark.parametrize("beta", [0.7, 1000.0])
def test_dco_loss_matches_independent_computation(average, beta):
    pred, ref, target = fixed_tensors()
    ref = pred + 0.05 * (ref - pred)  # close to pred so beta=1000 does not saturate everything
    got = dco_loss(pred.float(), ref.float(), target.float(), beta=beta, average=average)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(independent_dco(pred, ref, target, beta, average), rel=1e-4, abs=1e-5)


def test_dco_averaging_switch_differs_and_reference_gets_no_gradient():
    pred, ref, target = (t.float() for t in fixed_tensors())
    pred.requires_grad_(True)
    ref.requires_grad_(True)
    batch = dco_loss(pred, ref, target, beta=0.7, average="batch")
    sample = dco_loss(pred, ref, target, beta=0.7, average="sample")
    assert not torch.allclose(batch, sample)
    batch.backward()
    assert ref.grad is None and pred.grad is not None
    with pytest.raises(ValueError, match="averaging"):
        dco_loss(pred, ref, target, average="token")


def test_mse_and_prediction_targets():
    from diffusers import DDPMScheduler

    x0, noise, pred = (t.float() for t in fixed_tensors())
    assert float(mse_loss(pred, noise)) == pytest.approx(float(((pred - noise) ** 2).mean()), rel=1e-6)
    timesteps = torch.tensor([0, 500, 999])
    assert prediction_target(DDPMScheduler(), x0, noise, timesteps) is noise
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(prediction_target(scheduler, x0, noise, timesteps), expected, atol=1e-6)
    assert prediction_target(DDPMScheduler(prediction_type="sample"), x0, noise, timesteps) is x0


# ---------------------------------------------------------------------------------------------
# Kohya layout


def test_kohya_keys_and_round_trip():
    modules = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in",
               "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    state = {}
    for i, m in enumerate(modules):
        state[f"unet.{m}.lora_A.weight"] = torch.full((4, 8), float(i))
        state[f"unet.{m}.lora_B.weight"] = torch.full((8, 4), -float(i))
    kohya = to_kohya(state, alpha=2.0)
    assert set(kohya) == {
        f"lora_unet_{m.replace('.', '_')}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert float(kohya["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 2.0
    assert torch.equal(kohya["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"], torch.full((4, 8), 1.0))
    back, alphas = from_kohya(kohya, modules + ["down_blocks.1", "mid_block"])
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert alphas == {m: 2.0 for m in modules}
