"""Per-subject tuning: sweep one guidance rule's strength knob, score it, recommend a setting.

A subject's adapter trades text alignment against identity differently from the next one, so the
guidance strength that suits one subject over- or under-guides another. :func:`tune` samples a
small prompt set (normal and stylized prompts) at a few values of the chosen mode's knob
(``guidance.MODES[mode].knob``: ``w_cons`` for consistency guidance), scores every image for
text alignment and identity, and picks one point of the resulting curve:

- the **knee** (default): both axes normalized to [0, 1] over the swept points (min to max), the
  point farthest from the chord joining the curve's two ends (the lowest and the highest knob
  value); ties go to the lower knob value. Where the curve bends most, a step along the knob
  stops buying one score cheaply with the other.
- with an **identity floor** X: the point with the most text alignment whose identity is >= X
  (ties: the higher identity); an error if no point reaches X.

Subjects come in two kinds (:class:`Workbench`): a toy-world subject on a CPU
(:func:`toyworld_workbench`: the bundled base model and adapter, scored by the world's evaluators)
or an adapter on a diffusers model (:func:`model_workbench`: scored with DINO identity and CLIP-T
text alignment from :mod:`dreamguide.metrics`, whose backbones are loaded before anything is
sampled). Outputs in the run folder: ``points.jsonl`` (one line per finished knob value, rewritten
atomically after each, so an interrupted run resumes where it stopped), ``run.json`` (the settings
the points were made with; a rerun with other settings is refused), ``tune.json`` (every point),
``tune.png`` (the curve) and ``tuned.json`` (the recommended sampling settings).

    settings = load_tuned("tune-out/tuned.json")          # modes, w_text, w_cons, pr, shaping
    SampleSettings(prompt="a <sks> dog in the snow", token="<sks>", class_word="dog", **settings)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dreamguide import guidance
from dreamguide.guidance import ConsistencyShaping, ParallelRescaling

POINTS_FILE = "points.jsonl"
RUN_FILE = "run.json"
TUNE_FILE = "tune.json"
PLOT_FILE = "tune.png"
TUNED_FILE = "tuned.json"
TUNED_KEYS = ("mode", "w_text", "w_cons", "pr", "shaping")

#: Knob values swept when none are given, per knob (six each: a few minutes on 2 CPU cores in the toy world).
DEFAULT_VALUES: dict[str, tuple[float, ...]] = {
    "w_cons": (0.0, 0.75, 1.5, 2.25, 3.0, 4.5),
    "w_text": (3.0, 5.0, 7.5, 10.0, 12.5, 15.0),
    "shaping.spread_cap": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    "shaping.norm_bound": (0.05, 0.1, 0.2, 0.4, 0.8, 1.6),
    "shaping.magnitude_ratio": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0),
    "shaping.parallel_target": (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0),
    "shaping.pr_from": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
}

#: DreamBench-style prompt templates for real models; ``{}`` = "<token> <class word>" or the class word.
MODEL_PROMPTS: dict[str, tuple[str, ...]] = {
    "normal": ("a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
               "a red {}", "a shiny {}"),
    "stylized": ("a watercolor painting of a {}", "a pencil sketch of a {}", "an oil painting of a {}",
                 "a cartoon illustration of a {}", "a {} in the style of pixel art", "a neon sign of a {}"),
}


@dataclass(frozen=True)
class TuneSettings:
    """What to sweep and how to sample it (the settings a run folder is tied to).

    ``values`` ``()``: :data:`DEFAULT_VALUES` of the mode's knob. ``prompts_per_set``: prompts
    taken, evenly spaced, from each prompt set. ``height``/``width`` ``None``: the model's size.
    """

    mode: str = "consistency"
    values: tuple[float, ...] = ()
    w_text: float = guidance.W_TEXT
    w_cons: float = guidance.W_CONS
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)
    shaping: ConsistencyShaping = field(default_factory=ConsistencyShaping)
    steps: int = 20
    seeds: tuple[int, ...] = (0, 1)
    prompts_per_set: int = 4
    batch_size: int = 8
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        from dreamguide.sample_settings import check_finite, check_run, parse_seeds

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("mode", guidance.get_mode(self.mode).name)
        knob = self.knob
        group, _, name = knob.partition(".")
        if name and getattr(getattr(self, group), name) != getattr(type(getattr(self, group))(), name):
            raise ValueError(f"{knob} is the knob mode {self.mode!r} sweeps, so its values set it: leave it out of "
                             f"the {group} switches and give them as the sweep's values, e.g. --values 0.25,0.5,1")
        values = tuple(self.values) or DEFAULT_VALUES.get(knob, ())
        if not values:
            raise ValueError(f"mode {self.mode!r} has knob {knob!r}, which has no default values; "
                             f"pass them, e.g. values=(0.5, 1.0, 2.0) (--values 0.5,1,2)")
        values = tuple(check_finite(f"knob value of {knob}", v) for v in values)
        if len(values) < 2 or len(set(values)) != len(values):
            raise ValueError(f"a sweep needs at least two different knob values, got {list(values)}; "
                             f"e.g. --values 0,1.5,3")
        set_("values", tuple(sorted(values)))
        for value in self.values:
            self.guide_kwargs(value)  # every value must make valid switches: the usual error naming the field
        set_("seeds", parse_seeds(self.seeds))
        check_run(self.steps, self.batch_size, "default")
        if not isinstance(self.prompts_per_set, int) or self.prompts_per_set < 1:
            raise ValueError(f"prompts_per_set must be a positive integer, got {self.prompts_per_set!r}")

    @property
    def knob(self) -> str:
        return guidance.get_mode(self.mode).knob

    def guide_kwargs(self, value: float) -> dict:
        """w_text, w_cons, pr, shaping with the knob at ``value``."""
        return guidance.with_knob(self.mode, value, w_text=self.w_text, w_cons=self.w_cons, pr=self.pr,
                                  shaping=self.shaping)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "knob": self.knob, "values": list(self.values), "w_text": self.w_text,
                "w_cons": self.w_cons, "pr": self.pr.to_dict(), "shaping": self.shaping.to_dict(),
                "steps": self.steps, "seeds": list(self.seeds), "prompts_per_set": self.prompts_per_set,
                "batch_size": self.batch_size, "height": self.height, "width": self.width}


@dataclass
class Workbench:
    """A subject ready to tune: its sampler, prompt cases and scorer.

    ``cases``: (prompt set, token prompt, base prompt). ``score(images, base_prompts)`` returns
    (text alignment, identity) per image as two lists of floats. ``source`` describes the subject
    (model, adapter, references) and is part of the settings a run folder is tied to.
    """

    sampler: object
    token: str
    class_word: str
    cases: list[tuple[str, str, str]]
    score: Callable[[list, list[str]], tuple[list[float], list[float]]]
    source: dict


def spread(items: Sequence, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (all of them if there are no more than ``n``)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def toyworld_workbench(subject: str = "sks", method: str = "dreambooth", prompts_per_set: int = 4,
                       evaluators=None, device: str = "cpu") -> Workbench:
    """A toy-world subject with its bundled adapter, scored by the world's evaluators (text alignment,
    identity against ``subjects.reference_images``) on its normal and stylized prompt sets."""
    from dreamguide.sampling import Sampler
    from dreamguide.toyworld.evaluators import ToyEvaluators
    from dreamguide.toyworld.model import BUNDLED_MODEL_DIR
    from dreamguide.toyworld.personalize import adapter_dir, load_personalized
    from dreamguide.toyworld.prompts import PROMPT_SETS
    from dreamguide.toyworld.render import from_pil
    from dreamguide.toyworld.subjects import get_subject, reference_images

    found = get_subject(subject)
    model, token = load_personalized(found.token, method, device=device)
    evaluators = evaluators or ToyEvaluators.load()
    references = reference_images(found)
    cases = [(name, template.format(f"{token} {found.cls}"), template.format(found.cls))
             for name in ("normal", "stylized") for template in spread(PROMPT_SETS[name], prompts_per_set)]

    def score(images, base_prompts):
        pixels = from_pil(images)
        text = evaluators.text_alignment(pixels, list(base_prompts))
        identity = evaluators.identity(pixels, references)
        return [float(v) for v in text], [float(v) for v in identity]

    folder = adapter_dir(found.token, method)
    sampler = Sampler(model, sources={"model": str(BUNDLED_MODEL_DIR), "lora": str(folder)})
    return Workbench(sampler, token, found.cls, cases, score,
                     {"kind": "toyworld", "subject": found.token, "method": method})


def reference_files(folder) -> list[Path]:
    """The image files of a reference folder, sorted; a missing folder or none is a FileNotFoundError."""
    from dreamguide.filenames import IMAGE_SUFFIXES
    from dreamguide.images import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist; pass the folder of the subject's photos")
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the reference folder {folder}")
    return files


def load_scorer(backbones=None, device: str = "cpu"):
    """The DINO + CLIP-T scorer; a missing backbone is a BackboneUnavailable saying which and how to fix it."""
    from dreamguide.metrics import BackboneUnavailable, Backbones, Scorer

    backbones = backbones or Backbones()
    try:
        return Scorer(backbones, metrics=("dino", "clip_t"), device=device)
    except BackboneUnavailable as error:
        raise BackboneUnavailable(
            f"dreamguide tune scores identity with DINO ({backbones.dino}) and text alignment with CLIP-T "
            f"({backbones.clip}), and one of them is not available; nothing was sampled. {error}"
        ) from error


def model_workbench(model: str, *, token: str, class_word: str, references, lora=None, embeddings=None,
                    prompts_per_set: int = 4, backbones=None, device: str | None = None,
                    dtype: str | None = None, model_config=None) -> Workbench:
    """An adapter (LoRA and/or token embeddings) on a model (a diffusers folder or hub id, or a single-file
    checkpoint read with the config folder ``model_config``), scored with DINO identity against the
    photos in ``references`` and CLIP-T text alignment with the base prompt (:mod:`dreamguide.metrics`).

    The metric backbones and the reference photos are loaded first, so a missing one fails before
    the diffusion model is loaded or anything sampled.
    """
    from dreamguide.images import read_images
    from dreamguide.models import parse_device
    from dreamguide.sampling import Sampler

    if not (lora or embeddings):
        raise ValueError("tuning needs the subject's adapter: pass a LoRA (--lora) and/or embeddings (--embeddings)")
    if not token or not class_word:
        raise ValueError("tuning a model needs the subject's token and class word, e.g. --token '<sks>' "
                         "--class-word dog")
    files = reference_files(references)
    device = str(parse_device(device))
    scorer = load_scorer(backbones, device)
    refs = scorer.embed_references(read_images(files)[0])
    sampler = Sampler.from_pretrained(model, lora=lora, embeddings=embeddings, token=token, dtype=dtype,
                                      device=device, model_config=model_config)
    cases = [(name, template.format(f"{token} {class_word}"), template.format(class_word))
             for name, templates in MODEL_PROMPTS.items() for template in spread(templates, prompts_per_set)]

    def score(images, base_prompts):
        rows = scorer.score(images, list(base_prompts), refs)
        return [r["clip_t"] for r in rows], [r["dino"] for r in rows]

    source = {"kind": "model", "model": str(model), "lora": None if lora is None else str(lora),
              "embeddings": None if embeddings is None else str(embeddings), "token": token,
              "class_word": class_word, "references": [str(p) for p in files],
              "backbones": {"dino": scorer.backbones.dino, "clip": scorer.backbones.clip}}
    if model_config is not None:
        source["model_config"] = str(model_config)
    return Workbench(sampler, token, class_word, cases, score, source)


# ---------------------------------------------------------------------------------------------
# Choosing a point


def knee(text: Sequence[float], identity: Sequence[float]) -> int:
    """Index of the knee of a curve given in knob order (see the module docstring for the definition)."""
    if len(text) != len(identity) or len(text) < 2:
        raise ValueError(f"a curve needs at least two points with both scores, got {len(text)} and {len(identity)}")

    def normalized(values):
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

    x, y = normalized(text), normalized(identity)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    length = math.hypot(dx, dy)
    if length == 0:
        return 0
    distances = [abs(dx * (y[i] - y[0]) - dy * (x[i] - x[0])) / length for i in range(len(x))]
    return distances.index(max(distances))


def best_above_floor(text: Sequence[float], identity: Sequence[float], floor: float) -> int:
    """Index of the point with the most text alignment whose identity is >= ``floor`` (ties: more identity)."""
    above = [i for i in range(len(text)) if identity[i] >= floor]
    if not above:
        best = max(range(len(identity)), key=lambda i: identity[i])
        raise ValueError(f"no swept point reaches identity {floor:g}: the highest is {identity[best]:.4f}; "
                         f"lower --identity-floor or sweep stronger knob values (--values)")
    return max(above, key=lambda i: (text[i], identity[i]))


# ---------------------------------------------------------------------------------------------
# Running a sweep


def _read_points(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_run(output: Path, run: dict) -> None:
    """Tie ``output`` to ``run``; a folder made with other settings is refused, naming what differs."""
    from dreamguide.evaluation.runner import check_run_file

    if not (output / RUN_FILE).is_file() and (output / POINTS_FILE).exists():
        raise ValueError(f"{output / POINTS_FILE} exists without {RUN_FILE}; choose another --output folder")
    check_run_file(output, run, what="tuning run", fix="choose another --output folder")


def _means(rows: list[dict]) -> dict:
    return {"images": len(rows), **{key: sum(r[key] for r in rows) / len(rows)
                                    for key in ("text_alignment", "identity")}}


def sample_point(bench: Workbench, settings: TuneSettings, value: float) -> dict:
    """Sample and score every (prompt, seed) at knob ``value``: the means overall and per prompt set."""
    from dreamguide.sampling import SampleItem

    kwargs = settings.guide_kwargs(value)
    keys = [(case, seed) for case in bench.cases for seed in settings.seeds]
    items = [SampleItem(prompt=prompt, base_prompt=base, mode=settings.mode, seed=seed, token=bench.token,
                        class_word=bench.class_word, **kwargs) for (_, prompt, base), seed in keys]
    results = bench.sampler.sample_items(items, steps=settings.steps, batch_size=settings.batch_size,
                                         height=settings.height, width=settings.width, progress=False)
    text, identity = bench.score([r.image for r in results], [base for (_, _, base), _ in keys])
    rows = [{"set": case[0], "text_alignment": t, "identity": i} for (case, _), t, i in zip(keys, text, identity)]
    sets = list(dict.fromkeys(case[0] for case in bench.cases))
    return {"value": value, **_means(rows), "sets": {s: _means([r for r in rows if r["set"] == s]) for s in sets}}


def tune(bench: Workbench, settings: TuneSettings, output, *, identity_floor: float | None = None,
         progress: bool = True, on_point: Callable[[dict], None] | None = None, log=print) -> dict:
    """Sweep, score, choose; write the run folder's files and return the tune.json record.

    Finished points in ``output`` (same settings) are reused; ``on_point`` is called with each
    point as soon as it is stored.
    """
    from tqdm.auto import tqdm

    from dreamguide.atomic import atomic_write_text

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    run = {"settings": settings.to_dict(), "subject": bench.source,
           "prompts": [{"set": s, "prompt": p, "base_prompt": b} for s, p, b in bench.cases]}
    _check_run(output, run)
    points = [p for p in _read_points(output / POINTS_FILE) if p["value"] in settings.values]
    done = {p["value"] for p in points}
    todo = [v for v in settings.values if v not in done]
    if done:
        log(f"resuming {output}: {len(done)} of {len(settings.values)} knob values already done")
    images = len(bench.cases) * len(settings.seeds)
    with tqdm(total=len(settings.values), initial=len(done), disable=not progress, unit="point",
              desc=f"tune {settings.knob}") as bar:
        for value in todo:
            bar.set_postfix_str(f"{settings.knob}={value:g}, {images} images")
            point = sample_point(bench, settings, value)
            points.append(point)
            lines = "".join(json.dumps(p) + "\n" for p in points)
            atomic_write_text(output / POINTS_FILE, lines)
            bar.update(1)
            if on_point is not None:
                on_point(point)
    points.sort(key=lambda p: p["value"])
    return write_results(output, settings, run, points, identity_floor, log)


def choose(points: list[dict], identity_floor: float | None = None) -> tuple[int, str]:
    """(index of the recommended point, how it was chosen) for points in knob order."""
    text = [p["text_alignment"] for p in points]
    identity = [p["identity"] for p in points]
    if identity_floor is None:
        return knee(text, identity), "knee"
    return best_above_floor(text, identity, identity_floor), f"identity-floor {identity_floor:g}"


def write_results(output: Path, tuning: TuneSettings, run: dict, points: list[dict], identity_floor: float | None,
                  log=print) -> dict:
    from dreamguide.atomic import atomic_write_text

    index, rule = choose(points, identity_floor)
    best = points[index]
    kwargs = tuning.guide_kwargs(best["value"])
    tuned = {"mode": tuning.mode, "w_text": kwargs["w_text"], "w_cons": kwargs["w_cons"],
             "pr": kwargs["pr"].to_dict(), "shaping": kwargs["shaping"].to_dict(),
             "tune": {"knob": tuning.knob, "value": best["value"], "chosen_by": rule,
                      "text_alignment": best["text_alignment"], "identity": best["identity"],
                      "subject": run["subject"], "steps": tuning.steps}}
    record = {**run, "knob": tuning.knob, "points": points, "chosen": {"index": index, "by": rule,
                                                                        "value": best["value"]}}
    atomic_write_text(output / TUNE_FILE, json.dumps(record, indent=1) + "\n")
    atomic_write_text(output / TUNED_FILE, json.dumps(tuned, indent=1) + "\n")
    plot(record, output / PLOT_FILE)
    log(f"recommended {tuning.knob} = {best['value']:g} ({rule}): text alignment {best['text_alignment']:.4f}, "
        f"identity {best['identity']:.4f}; wrote {output / TUNED_FILE}, {output / TUNE_FILE}, {output / PLOT_FILE}")
    return record


def plot(record: dict, path: Path) -> Path:
    """Identity against text alignment, one curve overall and one per prompt set, knob values annotated."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamguide.atomic import atomic_write_bytes

    points, chosen = record["points"], record["chosen"]["index"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sets = list(points[0]["sets"])
    for name in sets:
        ax.plot([p["sets"][name]["text_alignment"] for p in points], [p["sets"][name]["identity"] for p in points],
                ":o", ms=3, alpha=0.6, label=name)
    x, y = [p["text_alignment"] for p in points], [p["identity"] for p in points]
    ax.plot(x, y, "-o", color="black", label="all prompts")
    for p in points:
        ax.annotate(f"{p['value']:g}", (p["text_alignment"], p["identity"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.plot([x[chosen]], [y[chosen]], "*", color="tab:red", ms=16, label=f"chosen ({record['chosen']['by']})")
    ax.set_xlabel("text alignment")
    ax.set_ylabel("identity")
    ax.set_title(f"{record['settings']['mode']}: {record['knob']} swept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# Using the result


def load_tuned(path) -> dict:
    """``SampleSettings`` keyword arguments from a tuned.json: ``modes``, ``w_text``, ``w_cons``, ``pr``, ``shaping``.

    Use as ``SampleSettings(prompt=..., token=..., class_word=..., **load_tuned(path))``; to
    override one of them, update the dict first. Unknown keys are errors naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file {path} does not exist; make one with `dreamguide tune`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with keys {', '.join(TUNED_KEYS)}")
    unknown = sorted(set(data) - {*TUNED_KEYS, "tune"})
    missing = [key for key in TUNED_KEYS if key not in data]
    if unknown or missing:
        raise ValueError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; a tuned settings file "
                         f"holds {', '.join(TUNED_KEYS)} (and a 'tune' record)")
    for key in ("pr", "shaping"):
        if not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be an object of switches, got {data[key]!r}")
    known = {f for f in ParallelRescaling.__dataclass_fields__}
    if set(data["pr"]) - known:
        raise ValueError(f"{path}: unknown key(s) {sorted(set(data['pr']) - known)} in 'pr'; valid keys: "
                         f"{', '.join(sorted(known))}")
    return {"modes": (guidance.get_mode(data["mode"]).name,), "w_text": data["w_text"], "w_cons": data["w_cons"],
            "pr": ParallelRescaling(**data["pr"]),
            "shaping": ConsistencyShaping.from_dict(data["shaping"], f"'shaping' of {path}")}
