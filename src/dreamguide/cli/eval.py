"""``dreamguide eval``: score images for identity (DINO, DINOv2, CLIP-I) and text alignment (CLIP-T, SigLIP).

Identity metrics compare each image with the reference photos of the subject; text metrics
compare it with its base prompt (the prompt with the identifier token replaced by the class
word), given with ``--base-prompt`` or read from the image's dreamguide PNG metadata.
Writes one CSV row per image and prints the mean of every metric with its backbone.
"""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  dreamguide eval samples/dog/*.png --references ../shared/dreambench/dog --output samples/dog/scores.csv
  dreamguide eval img.png --references refs/ --base-prompt "a dog in the snow" --metrics dino,siglip
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dreamguide.metrics import METRICS, Backbones

    defaults = Backbones()
    parser = subparsers.add_parser(
        "eval",
        help="score images: identity (DINO, DINOv2, CLIP-I) and text alignment (CLIP-T, SigLIP)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--references", help="folder (or comma-separated files) of the subject's reference photos")
    parser.add_argument("--base-prompt", help="base prompt for text metrics (default: each PNG's metadata)")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, from {', '.join(METRICS)}")
    for name in ("dino", "dinov2", "clip", "siglip"):
        parser.add_argument(f"--{name}", default=getattr(defaults, name),
                            help=f"{name} backbone: hub id or folder (default {getattr(defaults, name)})")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per backbone forward (default 16)")
    parser.add_argument("--output", help="CSV file for the per-image scores (default: print only)")
    parser.add_argument("--unreadable", choices=("skip", "stop"), default="skip",
                        help="a file that cannot be decoded: skip it and list it (default), or stop with an error")
    parser.set_defaults(func=run)
    return parser


def _image_files(items, what: str):
    from pathlib import Path

    from dreamguide.filenames import IMAGE_SUFFIXES
    from dreamguide.images import image_files

    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise FileNotFoundError(f"{what} folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{what} {path} does not exist")
    return files


def _read(paths, unreadable: str, skipped: list):
    """(RGB images, their paths); unreadable files are added to ``skipped``, or stop the command."""
    from dreamguide.cli import CommandError
    from dreamguide.images import ImageReadError, read_images

    try:
        images, kept, missed = read_images(paths, skip_unreadable=unreadable == "skip")
    except ImageReadError as error:
        raise CommandError(f"{error}\n(pass --unreadable skip to score the others)") from None
    skipped += missed
    return images, kept


def _report_skipped(skipped: list, what: str) -> None:
    import sys

    if skipped:
        listed = "\n  ".join(f"{path}: {reason}" for path, reason in skipped)
        print(f"skipped {len(skipped)} {what} file(s) that cannot be read:\n  {listed}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import torch

    from dreamguide.atomic import atomic_write_text
    from dreamguide.evaluation.report import rows_to_csv
    from dreamguide.cli import CommandError
    from dreamguide.images import ImageReadError, open_rgb
    from dreamguide.metrics import METRICS, Backbones, Scorer, check_metrics

    metrics = check_metrics(tuple(m.strip() for m in args.metrics.split(",") if m.strip()))
    needs_refs = any(METRICS[m][0] == "identity" for m in metrics)
    needs_text = any(METRICS[m][0] == "text" for m in metrics)
    files = _image_files(args.images, "image")
    if needs_refs and not args.references:
        raise CommandError("identity metrics need --references (the subject's photos); or pass --metrics clip_t,siglip")
    skipped_refs: list = []
    references, reference_images = [], []
    if needs_refs:
        reference_paths = _image_files(args.references.split(","), "reference")
        reference_images, references = _read(reference_paths, args.unreadable, skipped_refs)
        _report_skipped(skipped_refs, "reference")
        if not references:
            raise CommandError("no reference photo could be read; see the list above")
    skipped: list = []
    prompts = {}
    for path in files:
        if not needs_text or args.base_prompt:
            prompts[path] = args.base_prompt or ""
            continue
        from dreamguide.images import read_png_metadata

        try:
            prompts[path] = read_png_metadata(path)["base_prompt"]
        except (ValueError, KeyError, OSError):
            try:
                open_rgb(path)
            except ImageReadError as error:
                if args.unreadable == "stop":
                    raise CommandError(f"{error}\n(pass --unreadable skip to score the others)") from None
                skipped.append((path, str(error)))
                continue
            raise CommandError(f"{path} has no base prompt in its metadata; pass --base-prompt") from None
    files = [path for path in files if path in prompts]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbones = Backbones(dino=args.dino, dinov2=args.dinov2, clip=args.clip, siglip=args.siglip)
    scorer = Scorer(backbones, metrics, device=device, batch_size=args.batch_size)

    refs = scorer.embed_references(reference_images) if needs_refs else None
    rows = []
    for start in range(0, len(files), args.batch_size):
        images, kept = _read(files[start : start + args.batch_size], args.unreadable, skipped)
        if images:
            scores = scorer.score(images, [prompts[path] for path in kept], refs)
            rows += [{"image": str(f), "base_prompt": prompts[f], **s} for f, s in zip(kept, scores)]
    _report_skipped(skipped, "image")
    if not rows:
        raise CommandError("no image file could be read; see the list above")
    if args.output:
        atomic_write_text(args.output, rows_to_csv(rows, ["image", "base_prompt", *metrics]))
    print(f"{len(rows)} images" + (f", {len(references)} reference photos" if needs_refs else "")
          + ("; text metrics score the base prompt" if needs_text else ""))
    for metric in metrics:
        mean = sum(r[metric] for r in rows) / len(rows)
        print(f"  {metric:7s} {mean:.4f}   ({backbones.for_metric(metric)})")
    if args.output:
        print(f"wrote {args.output}")
    return 0
