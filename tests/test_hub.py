"""Model card and Hub push of a training run (offline: the Hub API is replaced by a recorder)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreamguide import hub
from dreamguide.cli import main

BASE = "stabilityai/stable-diffusion-xl-base-1.0"
CONFIG_TOML = """\
[model]
pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
variant = "fp16"

[data]
instance_dir = "/home/someone/photos/dog"
token = "<sks>"
class_word = "dog"
instance_prompt = "a photo of {token} {class_word}"
resolution = 1024

[train]
method = "dco"
steps = 500
batch_size = 1
lr = 5e-05
mixed_precision = "bf16"
seed = 7

[lora]
rank = 16
alpha = 8.0
target_modules = ["to_q", "to_k", "to_v", "to_out.0"]

[ti]
enabled = true
lr = 5e-06

[dco]
beta = 1000.0
average = "batch"

[output]
dir = "/home/someone/runs/dog"
"""


def _write_samples(folder: Path, step: int, w_cons: float) -> None:
    """What training writes every sample.every steps: per prompt, one PNG per (mode, seed), a grid, settings.json."""
    from dreamguide.sampling import SampleResult, SampleSettings, save_results

    prompts = ["a photo of <sks> dog", "a watercolor painting of <sks> dog"]
    for i, prompt in enumerate(prompts):
        settings = SampleSettings(prompt=prompt, token="<sks>", class_word="dog", modes=("dreambooth", "pr"),
                                  seeds=(0,), steps=25, w_cons=w_cons)
        results = [
            SampleResult(Image.new("RGB", (8, 8), (40 * j, 0, 0)), 0, mode, prompt, settings.base_prompt, {})
            for j, mode in enumerate(settings.modes)
        ]
        save_results(results, folder / "samples" / f"step-{step:06d}" / f"prompt-{i}", settings)


# The run's name: the token "<sks>" without its angle brackets (no output.name, no "name" header).
KOHYA, SHARED_EMB = "sks.safetensors", "sks_emb.safetensors"


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A finished DCO + learned-token SDXL run as the trainer lays it out (two sample steps, a checkpoint, logs)."""
    folder = tmp_path / "dog-run"
    folder.mkdir()
    (folder / "config.toml").write_text(CONFIG_TOML, encoding="utf-8")
    metadata = {"token": "<sks>", "class_word": "dog", "base_model": BASE, "model_kind": "sdxl", "method": "dco",
                "steps": 500, "resolution": 1024, "config": {"data": {"instance_dir": "/home/someone/photos/dog"}}}
    header = {"dreamguide": json.dumps(metadata, sort_keys=True)}
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, folder / hub.LORA_FILE, header)
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, folder / KOHYA, header)
    for name in (hub.EMBEDDINGS_FILE, SHARED_EMB):
        save_file({"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(1, 8)}, folder / name, header)
    _write_samples(folder, 250, w_cons=2.0)
    _write_samples(folder, 500, w_cons=3.5)
    (folder / "log.jsonl").write_text('{"step": 1, "loss": 0.1}\n', encoding="utf-8")
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "adapter.safetensors").write_bytes(b"")
    (folder / "logs").mkdir()
    return folder


NEWEST = ["samples/step-000500/prompt-0/grid.png", "samples/step-000500/prompt-1/grid.png"]
SHARED = sorted(["README.md", hub.EMBEDDINGS_FILE, hub.LORA_FILE, KOHYA, SHARED_EMB, *NEWEST])


def test_read_run_and_card(run_dir):
    from huggingface_hub import ModelCard

    run = hub.read_run(run_dir)
    assert (run.token, run.class_word, run.method, run.model_kind, run.steps) == ("<sks>", "dog", "dco", "sdxl", 500)
    assert run.learned_token and run.sample_step == 500 and [s.image for s in run.samples] == NEWEST
    assert hub.shared_files(run) == SHARED

    path = hub.write_model_card(run_dir, license="openrail++")
    assert path == run_dir / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == BASE and card.data.library_name == "diffusers"
    assert card.data.license == "openrail++" and card.data.instance_prompt == "a photo of <sks> dog"
    assert {"stable-diffusion-xl", "lora", "dco", "textual-inversion", "dreamguide"} <= set(card.data.tags)
    assert card.data.widget == [
        {"text": "a photo of <sks> dog", "output": {"url": NEWEST[0]}},
        {"text": "a watercolor painting of <sks> dog", "output": {"url": NEWEST[1]}},
    ]
    text = card.text
    assert text.lstrip().startswith(hub.CARD_MARKER)
    assert f"Direct Consistency Optimization (DCO) LoRA with a learned token embedding of `{BASE}`" in text
    assert "for the subject `<sks> dog`" in text and "for 500 steps." in text
    assert "Write `<sks> dog` into the prompt, e.g. `a photo of <sks> dog`." in text
    for name in (hub.LORA_FILE, KOHYA, hub.EMBEDDINGS_FILE, SHARED_EMB):
        assert f"| `{name}` |" in text
    assert "`<lora:sks:1>`" in text and "trigger word `sks_emb`" in text
    # The guidance settings are those of the newest samples (w_cons 3.5 at step 500, not 2.0 at step 250).
    assert "made at training step 500" in text
    assert "| modes | `dreambooth`, `parallel-rescaled` |" in text and "| w_cons | `3.5` |" in text
    assert "| w_text | `7.5` |" in text and "| steps | `25` |" in text
    assert "normalization `standardize`" in text
    assert "--embeddings embeddings.safetensors" in text and "--modes dreambooth,parallel-rescaled" in text
    assert "--w-text 7.5 --w-cons 3.5" in text
    assert "| LoRA rank / alpha | `16 / 8.0` |" in text and "| DCO beta / average | `1000.0 / batch` |" in text
    assert "| token learning rate | `5e-06` |" in text and "| seed | `7` |" in text
    # Prompts stay visible on the Hub: "<sks>" outside code would be read as an HTML tag.
    assert f"`a watercolor painting of <sks> dog`\n\n![a watercolor painting of &lt;sks&gt; dog]({NEWEST[1]})" in text
    assert "ConsistencyGuidance" in text  # an SDXL run can use the diffusers guider
    assert "/home/someone" not in str(card)  # no local path from config.toml reaches the card


def test_card_of_the_bundled_toyworld_run_names_a_local_base_by_its_folder(tmp_path):
    from huggingface_hub import ModelCard

    bundled = Path(hub.__file__).parent / "toyworld" / "weights" / "subjects" / "sks-dreambooth"
    folder = shutil.copytree(bundled, tmp_path / "sks-dreambooth")
    card = ModelCard.load(hub.write_model_card(folder))
    assert card.data.base_model is None  # a local folder is no Hub id
    assert "DreamBooth LoRA of a local model folder named `base` for the subject `sks ball`" in card.text
    assert "This run wrote no sample images, so no guidance settings were checked on it." in card.text
    assert "widget" not in card.data.to_dict()
    assert "ConsistencyGuidance" not in card.text  # the toy world is no SDXL model
    named = ModelCard.load(hub.write_model_card(folder, base_model="me/toy-base"))
    assert named.data.base_model == "me/toy-base" and "DreamBooth LoRA of `me/toy-base`" in named.text


def test_hand_written_card_is_kept(run_dir):
    (run_dir / "README.md").write_text("# my own card\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"README.md was not written by dreamguide; keep it \(push with --keep-card\)"):
        hub.write_model_card(run_dir)
    assert (run_dir / "README.md").read_text(encoding="utf-8") == "# my own card\n"


class FakeHub:
    """Records what push_run asks of ``huggingface_hub.HfApi``, and which files the Hub's own filter would take."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(kwargs["folder_path"])
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        selected = list(filter_repo_objects(local, allow_patterns=kwargs["allow_patterns"]))
        self.calls.append(("upload_folder", kwargs, selected))


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_push_uploads_the_card_and_the_shared_files_only(run_dir, fake_hub, caplog):
    result = hub.push_run(run_dir, "me/dog-lora", private=True)
    assert result.url == "https://huggingface.co/me/dog-lora" and result.files == SHARED
    init, create, upload = fake_hub.calls
    assert init == ("init", None)
    assert create == ("create_repo", "me/dog-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    _, kwargs, selected = upload
    assert kwargs["repo_id"] == "me/dog-lora" and kwargs["repo_type"] == "model"
    assert Path(kwargs["folder_path"]) == run_dir
    assert selected == SHARED  # config.toml, log.jsonl, checkpoints and older samples stay local
    assert kwargs["commit_message"] == "Upload <sks> dog (dco) with dreamguide"
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    assert card.splitlines()[0] == "---" and "\n# dog-lora\n" in card  # titled after the repo
    # The local path in the weight headers is reported before it becomes public.
    expected = [f"{name}: config.data.instance_dir = /home/someone/photos/dog" for name in
                (hub.LORA_FILE, KOHYA, hub.EMBEDDINGS_FILE, SHARED_EMB)]
    assert sorted(result.local_paths) == sorted(expected)
    assert "will be public" in caplog.text


def test_push_keep_card_uploads_the_card_as_it_is(run_dir, fake_hub):
    (run_dir / "README.md").write_text("# my own card\n", encoding="utf-8")
    result = hub.push_run(run_dir, "me/dog-lora", keep_card=True)
    assert result.files == SHARED and fake_hub.calls[-1][2] == SHARED
    assert (run_dir / "README.md").read_text(encoding="utf-8") == "# my own card\n"


def test_cli_push(run_dir, fake_hub, capsys):
    assert main(["push", str(run_dir), "--repo", "me/dog-lora", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert [line.strip() for line in out.out.splitlines()[2:]] == SHARED
    assert "warning: local path in a shared file: pytorch_lora_weights.safetensors: config.data.instance_dir" in out.err
    assert fake_hub.calls == []  # a dry run talks to nobody

    assert main(["push", str(run_dir), "--repo", "me/dog-lora", "--base-model", "me/base", "--message", "v1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "pushed: https://huggingface.co/me/dog-lora"
    assert [line.strip() for line in out.splitlines()[1:]] == SHARED
    assert fake_hub.calls[1][2]["private"] is None and fake_hub.calls[2][1]["commit_message"] == "v1"
    assert "base_model: me/base" in (run_dir / "README.md").read_text(encoding="utf-8")


def test_cli_push_errors(run_dir, tmp_path, fake_hub, monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert main(["push", str(run_dir), "--repo", "dog-lora"]) == 2
    assert "error: repo 'dog-lora' must be owner/name, e.g. 'my-name/dog-lora'" in capsys.readouterr().err
    assert main(["push", str(run_dir), "--repo", "me/bad--name"]) == 2
    assert "error: repo 'me/bad--name' is not a valid Hub repo id" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "--repo", "me/dog"]) == 2
    assert "holds no trained weights (pytorch_lora_weights.safetensors or embeddings.safetensors)" in (
        capsys.readouterr().err
    )

    def offline(self, repo_id, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")

    monkeypatch.setattr(FakeHub, "create_repo", offline)
    assert main(["push", str(run_dir), "--repo", "me/dog-lora"]) == 2
    assert "error: cannot push while HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_push_and_hub_do_not_import_torch():
    code = (
        "import sys; import dreamguide.hub, dreamguide.cli.push; "
        "print(sorted(m for m in ('torch', 'diffusers', 'huggingface_hub') if m in sys.modules))"
    )
    src = Path(hub.__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(src), "PATH": ""}, check=True)
    assert out.stdout.strip() == "[]"


def test_shared_files_follow_the_recorded_run_name_and_old_runs_keep_their_kohya_file(run_dir):
    metadata = {"name": "rex", "token": "<sks>", "class_word": "dog", "base_model": BASE}
    header = {"dreamguide": json.dumps(metadata)}
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, run_dir / hub.LORA_FILE, header)
    save_file({"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(1, 8)}, run_dir / hub.EMBEDDINGS_FILE, header)
    for old in (KOHYA, SHARED_EMB):
        (run_dir / old).unlink()
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, run_dir / "rex.safetensors")
    run = hub.read_run(run_dir)
    assert run.name == "rex" and run.weights == (hub.LORA_FILE, "rex.safetensors", hub.EMBEDDINGS_FILE)
    (run_dir / "rex.safetensors").rename(run_dir / "pytorch_lora_weights_kohya.safetensors")
    assert hub.read_run(run_dir).weights == (hub.LORA_FILE, "pytorch_lora_weights_kohya.safetensors", hub.EMBEDDINGS_FILE)
