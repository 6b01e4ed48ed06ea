"""The app's state and actions: the model in use, its subject and adapter, comparisons, training runs.

A :class:`Workspace` holds one ``Sampler`` (the base model plus, usually, one subject's adapter)
and the :class:`LoadedSubject` it draws. :meth:`Workspace.compare` samples one prompt with several
guidance modes from the same seeds, exactly as ``dreamguide sample`` does, writes what that
command writes (PNGs with their settings, the labelled grid, ``settings.json``, ``trace.json``),
and adds the scores and the two plots. :meth:`Workspace.start_training` fine-tunes a subject
in the background and loads the new adapter when the run completes. :meth:`Workspace.tune` runs
``dreamguide tune`` at small settings for the loaded toy-world subject (:class:`TuneOutcome`).

Without a model (``model=None``) the workspace is the miniature world: the bundled base model
(``dreamguide.toyworld.model``), its subjects and bundled adapter, scored by its evaluators.
Everything is written under ``output``: ``samples/<time>/``, ``runs/<time>-<token>-<method>/``,
``adapters/`` (uploaded adapter files), ``subjects/`` (toy subjects' reference photos) and
``tune/<time>-<subject>-<mode>/`` (what ``dreamguide tune`` writes).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamguide.filenames import EMBEDDINGS_FILE, LORA_FILE
from dreamguide.ui.forms import (
    GENERAL,
    FieldChecks,
    FieldErrors,
    SampleForm,
    TrainForm,
    check_photos,
    photo_error_field,
    train_config,
    write_photos,
)
from dreamguide.ui.scores import ImageScore, MetricScorer, ToyScorer
from dreamguide.ui.training_job import TrainingJob

if TYPE_CHECKING:
    from PIL import Image

    from dreamguide.sampling import Sampler, SampleResult, SampleSettings

#: Sample prompts written during training (``{token}``, ``{class_word}`` filled in): a plain and a
#: stylized prompt, so the samples show identity against prompt adherence as the run goes.
TOY_TRAINING_PROMPTS = ("a photo of a {token} {class_word}", "a pencil sketch of a {token} {class_word}")
TRAINING_PROMPTS = ("a photo of {token} {class_word}", "a watercolor painting of {token} {class_word}")
TRAINING_SAMPLE_MODES = ("dreambooth", "parallel-rescaled")
#: Steps between sample images during training, by world (True: the miniature world, whose steps are cheap).
TRAINING_SAMPLE_EVERY = {True: 100, False: 250}


def mode_label(mode: str) -> str:
    """A mode's short column name: its alias (``parallel-rescaled`` -> ``pr``), else its name."""
    from dreamguide.guidance import ALIASES

    return next((short for short, full in ALIASES.items() if full == mode), mode)


@dataclass(frozen=True)
class LoadedSubject:
    """What the loaded adapter draws: its token and class word, reference photos, and weight files."""

    name: str
    token: str | None = None
    class_word: str | None = None
    references: tuple[Path, ...] = ()
    lora: Path | None = None
    embeddings: Path | None = None

    def reference_images(self) -> list["Image.Image"]:
        from PIL import Image

        images = []
        for path in self.references:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return images


@dataclass
class Comparison:
    """One prompt sampled in several modes from the same seeds, with what was written and measured."""

    settings: "SampleSettings"
    results: list["SampleResult"]
    folder: Path
    #: One PNG per result (same order), its settings in the metadata.
    images: list[Path]
    #: Everything to download: the images, the labelled grid, settings.json, trace.json, scores.csv.
    files: list[Path]
    #: One per result when reference photos are known and the scorer loaded; else None and ``note`` says why.
    scores: list[ImageScore] | None = None
    score_names: tuple[str, str] = ("identity", "text alignment")
    note: str = ""
    consistency_p: Path | None = None
    tradeoff: Path | None = None
    seconds: float = 0.0
    modes: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


#: Knob values one tune run of the page sweeps (spread over ``dreamguide tune``'s defaults) and its prompts per set.
TUNE_VALUES = 4
TUNE_PROMPTS_PER_SET = 2


@dataclass
class TuneOutcome:
    """A finished tune run: the recommended knob value and the files ``dreamguide tune`` wrote."""

    folder: Path
    #: The tune.json record (settings, every point, the chosen one).
    record: dict
    #: The tuned.json settings (``dreamguide sample --settings``).
    tuned: dict
    plot: Path
    mode: str
    knob: str
    value: float

    @property
    def field(self) -> str:
        """The sample form's field of the knob: ``w_cons``, ``w_text`` or a shaping field's name."""
        return self.knob.removeprefix("shaping.")

    def summary(self) -> str:
        best = self.tuned["tune"]
        return (f"{self.mode}: recommended {self.knob} = {self.value:g} ({best['chosen_by']} of "
                f"{len(self.record['points'])} values; text alignment {best['text_alignment']:.3f}, identity "
                f"{best['identity']:.3f}); settings file {self.folder / 'tuned.json'}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text) or "subject"


def _new_folder(parent: Path, name: str) -> Path:
    """``parent/name`` (or ``name-2``, ``name-3``, ... when taken), created."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free folder name for {name!r} under {parent}")


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class Workspace:
    """The model in use and what the page does with it (see the module docstring).

    ``model``: hub id, diffusers folder or single-file ``.safetensors`` checkpoint of an SDXL / SD 1.x
    model; None for the miniature world. ``model_config``: the config folder (or hub id) a single-file
    checkpoint is read with (``load_model``'s ``config``; None: its architecture's reference configs).
    ``device``/``dtype``: as ``dreamguide sample --device/--dtype`` (None: CUDA when available,
    float16 there, float32 on the CPU). ``scorer``: see :mod:`dreamguide.ui.scores` (default: the
    world's evaluators, or DINO + CLIP-T for real models).
    """

    def __init__(self, model: str | os.PathLike | None = None, output: str | os.PathLike = "ui-output",
                 device: str | None = None, dtype: str | None = None, scorer=None,
                 training_sample_steps: int | None = None, model_config: str | os.PathLike | None = None) -> None:
        from dreamguide.toyworld.model import BUNDLED_MODEL_DIR

        self.toy = model is None
        self.model = str(BUNDLED_MODEL_DIR) if model is None else os.fspath(model)
        #: The config folder (or hub id) a single-file checkpoint ``model`` is read with; None: the default.
        self.model_config = None if model_config is None else os.fspath(model_config)
        self.output = Path(output).resolve()
        self.device, self.dtype = device, dtype
        self.scorer = scorer or (ToyScorer() if self.toy else MetricScorer(device=device))
        self.sampler: "Sampler | None" = None
        self.subject = LoadedSubject(name="no subject: the base model")
        self.job: TrainingJob | None = None
        self.toy_adapter: tuple[str, str] | None = None
        if training_sample_steps is None:
            from dreamguide.sample_settings import PREVIEW_STEPS

            training_sample_steps = PREVIEW_STEPS
        #: Denoising steps of the sample images written during training (a preview, as ``[sample]`` steps).
        self.training_sample_steps = training_sample_steps
        self._lock = threading.RLock()

    # -- the miniature world's subjects -------------------------------------------------------

    @staticmethod
    def toy_subjects() -> list[tuple[str, str]]:
        """(token, "token class") of each of the world's subjects."""
        from dreamguide.toyworld.world import SUBJECTS

        return [(s.token, f"{s.token} {s.cls}") for s in SUBJECTS]

    def toy_reference_files(self, subject: str) -> list[Path]:
        """The subject's reference photos as PNG files (written once under ``subjects/``)."""
        from dreamguide.toyworld.personalize import write_reference_folder

        folder = self.output / "subjects" / _slug(subject)
        if not (folder / "ref-0.png").is_file():
            write_reference_folder(subject, folder)
        return sorted(folder.glob("ref-*.png"))

    @staticmethod
    def bundled_adapter(subject: str, method: str) -> Path | None:
        from dreamguide.toyworld.personalize import adapter_dir

        folder = adapter_dir(subject, method)
        return folder if (folder / LORA_FILE).is_file() else None

    def use_toy_subject(self, subject: str, method: str = "dreambooth") -> LoadedSubject:
        """Load a subject's bundled adapter; a subject without one is a :class:`FieldErrors` on ``subject``."""
        from dreamguide.toyworld.personalize import subject_token
        from dreamguide.toyworld.subjects import get_subject

        if not self.toy:
            raise FieldErrors({"subject": f"the toy world's subjects need the toy model; {self.model} is loaded"})
        try:
            subject_ = get_subject(subject)
        except ValueError as error:
            raise FieldErrors({"subject": str(error)}) from None
        folder = self.bundled_adapter(subject_.token, method)
        if folder is None:
            raise FieldErrors({"subject": (
                f"no bundled {method} adapter for {subject_.token} {subject_.cls}; train one with Start training "
                f"(or `dreamguide toyworld personalize --subject {subject_.token} --method {method}`)")})
        embeddings = folder / EMBEDDINGS_FILE
        return self.load(
            lora=folder / LORA_FILE, embeddings=embeddings if embeddings.is_file() else None,
            token=subject_token(subject_.token, method), class_word=subject_.cls,
            references=self.toy_reference_files(subject_.token),
            name=f"{subject_.token} {subject_.cls} (bundled {method} adapter)",
            toy_adapter=(subject_.token, method),
        )

    # -- loading -------------------------------------------------------------------------------

    def load(self, lora: str | os.PathLike | None = None, embeddings: str | os.PathLike | None = None,
             token: str | None = None, class_word: str | None = None, references: Sequence[str | os.PathLike] = (),
             name: str | None = None, toy_adapter: tuple[str, str] | None = None) -> LoadedSubject:
        """Load the base model with an adapter, as ``dreamguide sample --lora --embeddings --token`` does.

        A bad file or token is a :class:`FieldErrors` on ``lora``, ``embeddings`` or ``token``
        with the command line's message (every such message names its file).
        """
        from dreamguide.sampling import Sampler

        token = (token or "").strip() or None
        class_word = (class_word or "").strip() or None
        with self._lock:
            try:
                sampler = Sampler.from_pretrained(self.model, lora=lora, embeddings=embeddings, token=token,
                                                  dtype=self.dtype, device=self.device, model_config=self.model_config)
            except (ValueError, FileNotFoundError) as error:
                raise FieldErrors({_loading_field(str(error), lora, embeddings): str(error)}) from None
            self._release()
            self.sampler = sampler
            #: (subject, method) of a toy-world subject's bundled adapter, which :meth:`tune` can sweep.
            self.toy_adapter = toy_adapter
            if lora or embeddings:
                default = f"{token} {class_word}" if token else Path(lora or embeddings).parent.name
                self.subject = LoadedSubject(name or default, token, class_word, tuple(Path(p) for p in references),
                                       Path(lora) if lora else None, Path(embeddings) if embeddings else None)
            else:
                self.subject = LoadedSubject(name or "no subject: the base model",
                                       references=tuple(Path(p) for p in references))
            return self.subject

    def load_uploaded(self, lora: str | None, embeddings: str | None, token: str | None, class_word: str | None,
                      references: Sequence[str] = ()) -> LoadedSubject:
        """Copy uploaded adapter files and photos under ``adapters/`` (so image metadata names files that
        stay), then :meth:`load` them."""
        if not lora and not embeddings:
            raise FieldErrors({"lora": "no adapter file given; upload a LoRA (.safetensors) and/or token embeddings"})
        folder = _new_folder(self.output / "adapters", f"{_stamp()}-{_slug(token or 'adapter')}")
        copies = {}
        for key, source in (("lora", lora), ("embeddings", embeddings)):
            if source:
                copies[key] = folder / Path(source).name
                shutil.copyfile(source, copies[key])
        photos = []
        for i, source in enumerate(references):
            photos.append(folder / "references" / f"ref-{i}{Path(source).suffix.lower()}")
            photos[-1].parent.mkdir(exist_ok=True)
            shutil.copyfile(source, photos[-1])
        try:
            return self.load(copies.get("lora"), copies.get("embeddings"), token, class_word, photos)
        except FieldErrors:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def ensure_loaded(self) -> "Sampler":
        """The sampler; the base model alone when nothing was loaded yet."""
        with self._lock:
            if self.sampler is None:
                self.load()
            return self.sampler

    def _release(self) -> None:
        """Drop the current sampler's model (and the GPU memory it held) before another takes its place."""
        if self.sampler is None:
            return
        self.sampler = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    # -- tune --------------------------------------------------------------------------------

    def tune(self, form: SampleForm, values: Sequence[float] | None = None,
             prompts_per_set: int = TUNE_PROMPTS_PER_SET, progress: bool = False) -> TuneOutcome:
        """``dreamguide tune`` for the loaded subject at the page's small settings: the form's first
        mode (consistency when none is ticked), its weights, switches and steps, its first seed,
        ``values`` of the mode's knob (default: :data:`TUNE_VALUES` spread over the command's
        defaults), ``prompts_per_set`` normal and stylized prompts. Writes under ``tune/``.

        Bad form values are a :class:`FieldErrors` as for :meth:`compare` (a mode whose knob has no
        default values: ``modes``); a subject other than a toy-world subject's bundled adapter is a
        ``GENERAL`` error giving the ``dreamguide tune`` command to run instead.
        """
        from dreamguide.guidance import get_mode
        from dreamguide.tune import PLOT_FILE, TUNED_FILE, DEFAULT_VALUES, TuneSettings, spread, toyworld_workbench
        from dreamguide.tune import tune as run_tune
        from dreamguide.ui.forms import sample_settings

        form = dataclasses.replace(form, modes=list(form.modes or ()) or ["consistency"],
                                   prompt=form.prompt.strip() or f"a {form.token or ''} {form.class_word or ''}")
        settings = sample_settings(form)
        mode = settings.modes[0]
        with self._lock:
            if self.toy_adapter is None:
                raise FieldErrors({GENERAL: _tune_elsewhere(self)})
            subject, method = self.toy_adapter
        found = FieldChecks()
        tuning = found.check("modes", lambda: TuneSettings(
            mode=mode, w_text=settings.w_text, w_cons=settings.w_cons, pr=settings.pr, shaping=settings.shaping,
            steps=settings.steps, seeds=settings.seeds[:1], prompts_per_set=prompts_per_set,
            values=tuple(values or spread(DEFAULT_VALUES.get(get_mode(mode).knob, ()), TUNE_VALUES))))
        found.raise_if_any()
        bench = toyworld_workbench(subject, method, prompts_per_set=prompts_per_set,
                                   device=self.device or "cpu")
        folder = _new_folder(self.output / "tune", f"{_stamp()}-{_slug(subject)}-{mode}")
        record = run_tune(bench, tuning, folder, progress=progress, log=lambda text: print(text, flush=True))
        tuned = json.loads((folder / TUNED_FILE).read_text(encoding="utf-8"))
        return TuneOutcome(folder=folder, record=record, tuned=tuned, plot=folder / PLOT_FILE, mode=mode,
                           knob=tuning.knob, value=record["chosen"]["value"])

    # -- sample and compare --------------------------------------------------------------------

    def compare(self, settings: "SampleSettings", progress: bool = False) -> Comparison:
        """Sample ``settings`` (every mode x seed), save like ``dreamguide sample``, score and plot.

        Inputs the sampler cannot use are a :class:`FieldErrors`: modes that need an adapter when
        none is loaded (``modes``), a toy-world prompt outside the world's grammar (``prompt``).
        """
        for comparison in self.compare_steps(settings, progress):
            pass
        return comparison

    def compare_steps(self, settings: "SampleSettings", progress: bool = False) -> Iterator[Comparison]:
        """:meth:`compare`, yielding the comparison after every batch of images (no scores yet) and
        then complete. The batches are the ones ``Sampler.sample`` runs, so the images are the same."""
        from dreamguide.images import save_png
        from dreamguide.sampling import image_filename, no_personalization_message, save_results

        started = time.time()
        with self._lock:
            sampler = self.ensure_loaded()
            subject = self.subject
            if settings.needs_personalized and not sampler.is_personalized(settings.token):
                raise FieldErrors({"modes": no_personalization_message(settings.modes)})
            if self.toy:
                from dreamguide.toyworld.demo import check_grammar

                try:
                    check_grammar(settings.prompt, settings.base_prompt)
                except ValueError as error:
                    raise FieldErrors({"prompt": str(error)}) from None
            folder = _new_folder(self.output / "samples", _stamp())
            comparison = Comparison(settings=settings, results=[], folder=folder, images=[], files=[],
                                    modes=list(settings.modes), seeds=list(settings.seeds))
            items = settings.items()
            run = dict(steps=settings.steps, scheduler=settings.scheduler, batch_size=settings.batch_size,
                       trace=settings.trace, progress=progress, height=settings.height, width=settings.width,
                       clipped_model_output=settings.clipped_model_output)
            for start in range(0, len(items), settings.batch_size):
                for result in sampler.sample_items(items[start : start + settings.batch_size], **run):
                    comparison.results.append(result)
                    comparison.images.append(save_png(result.image, folder / image_filename(result), result.metadata))
                comparison.seconds = time.time() - started
                if len(comparison.results) < len(items):
                    yield comparison
            written = save_results(comparison.results, folder, settings=settings, sampler=sampler)
        comparison.files = [*written["image"], *written["grid"], *written["settings"], *written["trace"]]
        self._score_and_plot(comparison, subject)
        comparison.seconds = time.time() - started
        yield comparison

    def _score_and_plot(self, comparison: Comparison, subject: LoadedSubject) -> None:
        from dreamguide.atomic import atomic_write_text
        from dreamguide.ui.plots import plot_consistency_p, plot_tradeoff

        results, folder = comparison.results, comparison.folder
        labels = {mode: mode_label(mode) for mode in comparison.modes}
        comparison.consistency_p = plot_consistency_p(results, folder / "consistency_p.png", labels)
        references = subject.reference_images() if subject.references else []
        if not references:
            comparison.note = ("no scores: the identity score needs the subject's reference photos; load the "
                               "adapter together with its photos")
        else:
            try:
                comparison.scores = self.scorer.score([r.image for r in results], [r.base_prompt for r in results],
                                                      references)
                comparison.score_names = (self.scorer.identity_name, self.scorer.text_name)
            except (OSError, ValueError, ImportError) as error:  # e.g. a metric backbone that is not available offline
                comparison.note = f"no scores: {error}"
        if comparison.scores is not None:
            identity, text = comparison.score_names
            comparison.tradeoff = plot_tradeoff([r.mode for r in results], comparison.scores,
                                                folder / "tradeoff.png", labels, x_label=text, y_label=identity)
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["file", "mode", "seed", "base_prompt", "identity", "text_alignment"])
            for path, result, score in zip(comparison.images, results, comparison.scores):
                writer.writerow([path.name, result.mode, result.seed, result.base_prompt,
                                 f"{score.identity:.6f}", f"{score.text_alignment:.6f}"])
            atomic_write_text(folder / "scores.csv", buffer.getvalue())
            comparison.files.append(folder / "scores.csv")
        comparison.files += [p for p in (comparison.consistency_p, comparison.tradeoff) if p is not None]

    # -- personalize ---------------------------------------------------------------------------

    def train_form_defaults(self) -> TrainForm:
        """The personalize form's starting values: the settings :meth:`train_base` gives a run."""
        from dreamguide.training import train_config_from_dict

        config = train_config_from_dict(self.train_base(Path("photos"), Path("adapter")), validate=False)
        return TrainForm(token="ohwx" if self.toy else config.data.token, class_word="", method=config.train.method,
                         steps=str(config.train.steps), lr=str(config.train.lr), rank=str(config.lora.rank),
                         batch_size=str(config.train.batch_size), sample_every=str(config.sample.every))

    def train_base(self, photos: Path, out: Path) -> dict[str, Any]:
        """A run's config before the form's values (a TOML file's worth): the trainer's defaults for
        this model, or in the miniature world its personalization recipe (``toyworld.personalize``)."""
        import torch

        cuda = (self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        base: dict[str, Any] = {
            "model": {"pretrained": self.model, **({"config": self.model_config} if self.model_config else {})},
            "data": {"instance_dir": str(photos)},
            "train": {"mixed_precision": "bf16" if cuda else "no"},
            "output": {"dir": str(out), "checkpoint_every": 250, "keep_checkpoints": 1},
            "sample": {"every": TRAINING_SAMPLE_EVERY[self.toy], "modes": list(TRAINING_SAMPLE_MODES), "seeds": [0],
                       "steps": self.training_sample_steps},
        }
        if self.toy:
            from dreamguide.toyworld.personalize import DEFAULTS

            base["data"].update(resolution=32, cache_latents=False)
            base["train"].update(steps=DEFAULTS.steps, lr=DEFAULTS.lr, batch_size=DEFAULTS.batch_size,
                                 seed=DEFAULTS.seed)
            base["lora"] = {"rank": DEFAULTS.rank, "alpha": float(DEFAULTS.rank),
                            "target_modules": list(DEFAULTS.lora_targets)}
            base["ti"] = {"lr": DEFAULTS.ti_lr}
            base["dco"] = {"beta": DEFAULTS.dco_beta}
            base["sample"]["prompts"] = list(TOY_TRAINING_PROMPTS)
        else:
            base["train"]["gradient_checkpointing"] = cuda
            base["sample"]["prompts"] = list(TRAINING_PROMPTS)
        return base

    def start_training(self, form: TrainForm, photos: Sequence[str | os.PathLike] = (), captions: str = "",
                       toy_subject: str | None = None) -> TrainingJob:
        """Check the form and the photos as ``dreamguide train`` would, then train in the background.

        ``toy_subject``: train one of the world's subjects on its reference photos (its token and
        class word replace the form's). Bad input is a :class:`FieldErrors` (``photos``,
        ``captions``, ``token``, ``class_word``, ``method``, ``steps``, ``lr``, ``rank``,
        ``batch_size``, ``sample_every``) and nothing is started.
        """
        if self.job is not None and self.job.state().live:
            raise FieldErrors({GENERAL: "a training run is in progress; cancel it (or wait) before starting another"})
        if toy_subject is not None:
            from dreamguide.toyworld.personalize import subject_token
            from dreamguide.toyworld.subjects import get_subject

            from dreamguide.training.config import METHODS

            subject_ = get_subject(toy_subject)
            token = subject_token(subject_.token, form.method if form.method in METHODS else METHODS[0])
            form = dataclasses.replace(form, token=token, class_word=subject_.cls)
        run = _new_folder(self.output / "runs", f"{_stamp()}-{_slug(form.token)}-{_slug(form.method)}")
        found = FieldChecks()
        if toy_subject is not None:
            from dreamguide.toyworld.personalize import write_reference_folder

            write_reference_folder(toy_subject, run / "photos", form.token)
        else:
            found.check("captions", lambda: write_photos(list(photos), captions, run / "photos"))
            (run / "photos").mkdir(exist_ok=True)
        config = train_config(form, self.train_base(run / "photos", run / "adapter"), found)
        if "captions" not in found.errors:
            try:
                check_photos(run / "photos", form.token.strip(), form.class_word.strip())
            except ValueError as error:
                found.errors.setdefault(photo_error_field(str(error)), str(error))
        if found.errors:
            shutil.rmtree(run, ignore_errors=True)
            found.raise_if_any()
        from dreamguide.training.data import list_images

        references = list_images(run / "photos")
        name = f"{config.data.token} {config.data.class_word} ({config.train.method}, trained here)"

        def load_trained(result) -> None:
            self.load(lora=result.lora_path, embeddings=result.embeddings_path, token=config.data.token,
                      class_word=config.data.class_word, references=references, name=name)

        job = TrainingJob(config, on_finished=load_trained, log=lambda text: print(text, flush=True))
        self.job = job
        job.start()
        return job


def _tune_elsewhere(workspace: Workspace) -> str:
    """Why the page cannot tune the loaded subject, and the ``dreamguide tune`` command that can."""
    s = workspace.subject
    if workspace.toy or not (s.lora or s.embeddings):
        return ("tuning needs a toy-world subject's bundled adapter: choose a subject and press Use this subject "
                "(or run `dreamguide tune --toyworld-subject TOKEN --method METHOD --output FOLDER`)")
    parts = [f"--model {workspace.model}"]
    parts += [f"--model-config {workspace.model_config}"] if workspace.model_config else []
    parts += [f"--lora {s.lora}"] if s.lora else []
    parts += [f"--embeddings {s.embeddings}"] if s.embeddings else []
    parts += [f"--token '{s.token}' --class-word {s.class_word}",
              f"--references {s.references[0].parent if s.references else 'PHOTO_FOLDER'}", "--output tune"]
    return ("tuning an adapter on a real model runs on the command line (it loads the DINO and CLIP "
            f"backbones and samples dozens of images): dreamguide tune {' '.join(parts)}")


def _loading_field(message: str, lora, embeddings) -> str:
    """The form field a loading error belongs to: the file it names, or the token it asks for."""
    if "need the token" in message or "token=" in message or "in the tokenizer" in message:
        return "token"
    if lora and os.fspath(lora) in message:
        return "lora"
    if embeddings and os.fspath(embeddings) in message:
        return "embeddings"
    return "model"
