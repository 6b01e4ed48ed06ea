"""Which personalization recipe makes plain DreamBooth overfit in the miniature world?

The PR paper's premise is that a DreamBooth-tuned model reproduces the reference photos and
ignores style words. This script fine-tunes toy-world subjects with a grid of recipes
(steps, learning rate, rank, LoRA targets) for ``dreambooth`` and ``dco``, samples stylized and
normal prompts in ``dreambooth`` mode (the personalized model with classifier-free guidance) and
``consistency`` mode, and reports per recipe:

* ``style kept``: fraction of stylized images whose style the attribute classifier reads as the
  prompt's (low = the model ignores style words, i.e. overfits);
* ``photo``: fraction of stylized images read as plain photos (the references' style);
* identity (toy DINO cosine to the references) and text alignment (toy CLIP to the base prompt).

Each (recipe, subject, method) runs in its own process, so a GPU is shared by many small jobs.

    python benchmarks/toyworld_overfit.py --out runs/overfit --jobs 12 --device cuda

Writes ``overfit.json`` and prints a table. Scoring runs in the parent on the CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from dreamguide.lora_files import LORA_TARGETS as ATTENTION
from dreamguide.toyworld.personalize import WIDE_TARGETS as ATTENTION_FF_TIME

ATTENTION_FF = ATTENTION + ("ff.net.0.proj", "ff.net.2")

#: name -> PersonalizeSettings overrides.
RECIPES: dict[str, dict] = {
    "r8-attn-300-1e-3": dict(steps=300, lr=1e-3, rank=8, lora_targets=ATTENTION),
    "r8-attn-600-3e-3": dict(steps=600, lr=3e-3, rank=8, lora_targets=ATTENTION),
    "r16-attnff-300-1e-3": dict(steps=300, lr=1e-3, rank=16, lora_targets=ATTENTION_FF),
    "r16-attnff-600-2e-3": dict(steps=600, lr=2e-3, rank=16, lora_targets=ATTENTION_FF),
    "r16-attnfft-600-2e-3": dict(steps=600, lr=2e-3, rank=16, lora_targets=ATTENTION_FF_TIME),
    "r32-attnfft-1000-2e-3": dict(steps=1000, lr=2e-3, rank=32, lora_targets=ATTENTION_FF_TIME),
    "r32-attnfft-1000-3e-3": dict(steps=1000, lr=3e-3, rank=32, lora_targets=ATTENTION_FF_TIME),
    "r32-attnfft-1500-2e-3": dict(steps=1500, lr=2e-3, rank=32, lora_targets=ATTENTION_FF_TIME),
    "r32-attnfft-1000-4e-3": dict(steps=1000, lr=4e-3, rank=32, lora_targets=ATTENTION_FF_TIME),
    "r32-attnfft-1500-3e-3": dict(steps=1500, lr=3e-3, rank=32, lora_targets=ATTENTION_FF_TIME),
    "r64-attnfft-1000-3e-3": dict(steps=1000, lr=3e-3, rank=64, lora_targets=ATTENTION_FF_TIME),
}


def run_job(task: tuple) -> dict:
    """Fine-tune one (recipe, subject, method) and sample; returns rows and uint8 images."""
    recipe, overrides, subject, method, out, device, steps, seeds, w_text, w_cons, threads = task
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from dreamguide.prompts import base_prompt
    from dreamguide.sampling import Sampler, SampleSettings
    from dreamguide.toyworld.personalize import DEFAULTS, personalize, subject_token
    from dreamguide.toyworld.prompts import NORMAL_TEMPLATES, STYLIZED_TEMPLATES
    from dreamguide.toyworld.subjects import get_subject

    settings = replace(DEFAULTS, **overrides)
    subj = get_subject(subject)
    token = subject_token(subject, method)
    started = time.time()
    result = personalize(subject, method, Path(out) / f"{recipe}-{subject}-{method}", settings, device=device)
    train_s = time.time() - started
    sampler = Sampler(result.model, adapter_name="subject")
    images, rows = [], []
    for set_name, templates in (("stylized", STYLIZED_TEMPLATES), ("normal", NORMAL_TEMPLATES[::3])):
        for template in templates:
            prompt = template.format(f"{token} {subj.cls}")
            sample = SampleSettings(prompt=prompt, token=token, class_word=subj.cls,
                                    base_prompt=base_prompt(prompt, token, subj.cls),
                                    modes=("dreambooth", "consistency"), seeds=tuple(seeds), batch_size=len(seeds),
                                    steps=steps, w_text=w_text, w_cons=w_cons)
            for r in sampler.sample(sample, progress=False):
                images.append(np.asarray(r.image.convert("RGB"), dtype=np.uint8))
                rows.append({"recipe": recipe, "subject": subject, "method": method, "prompt_set": set_name,
                             "template": template, "mode": r.mode, "seed": r.seed, "base_prompt": r.base_prompt})
    return {"rows": rows, "images": np.stack(images), "train_s": round(train_s, 1),
            "seconds": round(time.time() - started, 1), "settings": asdict(settings)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/overfit")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--subjects", nargs="+", default=["sks", "qlo"])
    parser.add_argument("--methods", nargs="+", default=["dreambooth", "dco"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--w-text", type=float, default=2.0)
    parser.add_argument("--w-cons", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-train-steps", type=int, default=0, help="cap every recipe's steps (smoke tests)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = {name: {**r, "steps": min(r["steps"], args.max_train_steps or r["steps"])} for name, r in RECIPES.items()}
    tasks = [(name, recipes[name], s, m, str(out), device, args.steps, list(range(args.seeds)), args.w_text,
              args.w_cons, args.threads) for name in args.recipes for s in args.subjects for m in args.methods]
    started = time.time()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(run_job, tasks, chunksize=1)
    else:
        done = [run_job(t) for t in tasks]
    generate_s = time.time() - started

    from dreamguide.toyworld.evaluators import ToyEvaluators
    from dreamguide.toyworld.subjects import reference_images

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    evaluators = ToyEvaluators.load()
    table = []
    for job in done:
        rows = job["rows"]
        images = torch.from_numpy(job["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        bases = [r["base_prompt"] for r in rows]
        judged = evaluators.judge(images, bases)
        photo = torch.tensor([s == "photo" for s in evaluators.classify(images)["style"]])
        text = evaluators.text_alignment(images, bases)
        identity = evaluators.identity(images, reference_images(rows[0]["subject"]))
        for mode in ("dreambooth", "consistency"):
            for set_name in ("stylized", "normal"):
                idx = [i for i, r in enumerate(rows) if r["mode"] == mode and r["prompt_set"] == set_name]
                table.append({**{k: rows[0][k] for k in ("recipe", "subject", "method")}, "mode": mode,
                              "prompt_set": set_name, "images": len(idx),
                              "style_kept": float(judged.style[idx].float().mean()),
                              "photo": float(photo[idx].float().mean()),
                              "carries_prompt": float(judged.all[idx].float().mean()),
                              "identity": float(identity[idx].mean()), "text_alignment": float(text[idx].mean()),
                              "train_s": job["train_s"]})
    record = {"args": vars(args), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "generate_seconds": round(generate_s, 1), "rows": table}
    (out / "overfit.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    print(f"{len(tasks)} jobs in {generate_s:.0f}s on {record['device']}")
    print("| recipe | method | mode | prompts | style kept | photo | carries | identity | text | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["recipe"], r["method"], r["mode"], r["prompt_set"]) for r in table},
                  key=lambda k: (args.recipes.index(k[0]), k[1], k[2], k[3]))
    for key in keys:
        sel = [r for r in table if (r["recipe"], r["method"], r["mode"], r["prompt_set"]) == key]
        mean = {k: float(np.mean([r[k] for r in sel])) for k in
                ("style_kept", "photo", "carries_prompt", "identity", "text_alignment", "train_s")}
        print(f"| {' | '.join(key)} | {mean['style_kept']:.2f} | {mean['photo']:.2f} | {mean['carries_prompt']:.2f} "
              f"| {mean['identity']:.3f} | {mean['text_alignment']:.3f} | {mean['train_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
