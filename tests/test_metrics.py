"""Metrics: each value equals an independent computation on tiny random backbones built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamguide.metrics import (
    METRICS,
    Backbones,
    BackboneUnavailable,
    Scorer,
    cosine_to_references,
    metric_backbones,
    siglip_probability,
)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from dreamguide.evaluation.tiny_backbones import save_tiny_backbones

    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="module")
def scorer(backbones):
    return Scorer(backbones, batch_size=2)


def _images(n, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")) for _ in range(n)]


PROMPTS = ["a dog in the snow", "a red backpack", "a watercolor painting of a cat"]


def _np_cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def test_formula_helpers_match_definitions():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    refs = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    # image 0: cos 1 and 0 -> 0.5; image 1: cos 1/sqrt2 twice -> 1/sqrt2
    assert cosine_to_references(a, refs).tolist() == pytest.approx([0.5, 2**-0.5])
    assert siglip_probability(torch.tensor([0.5]), 10.0, -2.0).item() == pytest.approx(1 / (1 + np.exp(-3.0)))


def test_dino_is_mean_cls_cosine_with_own_preprocessing(backbones, scorer):
    from transformers import ViTModel

    images, refs = _images(3, 0), _images(2, 1, size=(30, 30))
    got = [r["dino"] for r in scorer.score(images, PROMPTS, scorer.embed_references(refs))]
    model = ViTModel.from_pretrained(backbones.dino, add_pooling_layer=False).eval()

    def pixels(imgs):  # the saved processor: resize to 32x32 (bilinear), /255, normalize mean 0.5 std 0.5
        arrays = [np.asarray(i.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255 for i in imgs]
        return torch.from_numpy((np.stack(arrays) - 0.5) / 0.5).permute(0, 3, 1, 2)

    with torch.no_grad():
        gen = model(pixel_values=pixels(images)).last_hidden_state[:, 0].numpy()
        ref = model(pixel_values=pixels(refs)).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(got, _np_cos(gen, ref).mean(axis=1), rtol=1e-4, atol=1e-5)


def test_dinov2_and_clip_i_match_model_outputs(backbones, scorer):
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model

    images, refs = _images(3, 2), _images(3, 3)
    rows = scorer.score(images, PROMPTS, scorer.embed_references(refs))
    proc = AutoImageProcessor.from_pretrained(backbones.dinov2, backend="pil")
    dinov2 = Dinov2Model.from_pretrained(backbones.dinov2).eval()
    with torch.no_grad():
        def emb(imgs):  # DINOv2's pooler output is the CLS token after the final layer norm
            return dinov2(**proc(images=imgs, return_tensors="pt")).pooler_output.numpy()

        expected = _np_cos(emb(images), emb(refs)).mean(axis=1)
    np.testing.assert_allclose([r["dinov2"] for r in rows], expected, rtol=1e-4, atol=1e-5)

    proc = AutoImageProcessor.from_pretrained(backbones.clip, backend="pil")
    clip = CLIPModel.from_pretrained(backbones.clip).eval()
    with torch.no_grad():
        def emb(imgs):  # noqa: F811 (CLIP's projected image embeddings)
            return clip.get_image_features(**proc(images=imgs, return_tensors="pt")).pooler_output.numpy()

        expected = _np_cos(emb(images), emb(refs)).mean(axis=1)
    np.testing.assert_allclose([r["clip_i"] for r in rows], expected, rtol=1e-4, atol=1e-5)


def test_clip_t_and_siglip_follow_the_joint_forward(backbones, scorer):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

    images = _images(3, 4)
    rows = scorer.score(images, PROMPTS, scorer.embed_references(_images(1, 5)))

    clip = CLIPModel.from_pretrained(backbones.clip).eval()
    tok = AutoTokenizer.from_pretrained(backbones.clip)
    proc = AutoImageProcessor.from_pretrained(backbones.clip, backend="pil")
    with torch.no_grad():
        out = clip(**tok(PROMPTS, padding=True, return_tensors="pt"), **proc(images=images, return_tensors="pt"))
    # logits_per_image = exp(logit_scale) * cos(image_i, text_j): the diagonal pairs each image with its prompt
    expected = (out.logits_per_image.diag() / clip.logit_scale.exp()).detach().numpy()
    np.testing.assert_allclose([r["clip_t"] for r in rows], expected, rtol=1e-4, atol=1e-5)

    siglip = SiglipModel.from_pretrained(backbones.siglip).eval()
    tok = AutoTokenizer.from_pretrained(backbones.siglip)
    proc = AutoImageProcessor.from_pretrained(backbones.siglip, backend="pil")
    with torch.no_grad():
        out = siglip(**{"input_ids": tok(PROMPTS, padding="max_length", max_length=16, truncation=True,
                                         return_tensors="pt")["input_ids"]},
                     **proc(images=images, return_tensors="pt"))
    # SigLIP's probability is sigmoid(scale * cos + bias); the tiny model has scale e^1.5, bias -0.5
    expected = torch.sigmoid(out.logits_per_image.diag()).numpy()
    cos = out.image_embeds @ out.text_embeds.T
    np.testing.assert_allclose(expected, torch.sigmoid(np.exp(1.5) * cos.diag() - 0.5).numpy(), rtol=1e-5)
    np.testing.assert_allclose([r["siglip"] for r in rows], expected, rtol=1e-4, atol=1e-5)


def test_scores_do_not_depend_on_batch_size(backbones, scorer):
    images, refs = _images(5, 6), _images(2, 7)
    prompts = [PROMPTS[i % 3] for i in range(5)]
    one = Scorer(backbones, batch_size=1)
    a = scorer.score(images, prompts, scorer.embed_references(refs))
    b = one.score(images, prompts, one.embed_references(refs))
    for ra, rb in zip(a, b):
        assert set(ra) == set(METRICS)
        for metric in METRICS:
            assert ra[metric] == pytest.approx(rb[metric], abs=1e-5)


def test_text_metrics_only_need_no_references(backbones):
    scorer = Scorer(backbones, metrics=("clip_t", "siglip"))
    assert set(scorer.encoders) == {"clip", "siglip"}
    rows = scorer.score(_images(2, 8), PROMPTS[:2])
    assert all(0 < r["siglip"] < 1 and -1 <= r["clip_t"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="needs reference images"):
        Scorer(backbones, metrics=("dino",)).score(_images(1, 9), PROMPTS[:1])


def test_every_metric_names_its_backbone():
    ids = metric_backbones(Backbones())
    assert ids == {"dino": "facebook/dino-vits16@refs/pr/1", "dinov2": "facebook/dinov2-small",
                   "clip_i": "openai/clip-vit-base-patch32", "clip_t": "openai/clip-vit-base-patch32",
                   "siglip": "google/siglip-base-patch16-224"}


def test_unloadable_backbones_fail_with_the_id_and_the_fix(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable, match="nobody/no-such-dino.*hf download"):
        Scorer(Backbones(dino="nobody/no-such-dino"), metrics=("dino",))
    with pytest.raises(BackboneUnavailable, match="not a model folder"):
        Scorer(Backbones(clip=str(tmp_path)), metrics=("clip_t",))
    with pytest.raises(ValueError, match="expected a ViT"):
        Scorer(Backbones(dino=backbones.clip), metrics=("dino",))
    with pytest.raises(ValueError, match="unknown metric"):
        Scorer(backbones, metrics=("fid",))
    with pytest.raises(ValueError, match="unknown metric backbone 'dinov3'"):
        Backbones.from_dict({"dinov3": "x"})


def test_hub_ids_may_pin_a_revision(tmp_path):
    from dreamguide.metrics import split_revision

    assert split_revision("facebook/dino-vits16@refs/pr/1") == ("facebook/dino-vits16", "refs/pr/1")
    assert split_revision("facebook/dinov2-small") == ("facebook/dinov2-small", None)
    folder = tmp_path / "odd@name"
    folder.mkdir()
    assert split_revision(str(folder)) == (str(folder), None)
