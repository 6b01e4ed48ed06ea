"""The Gradio page over a :class:`~dreamguide.ui.workspace.Workspace`: Personalize, and Sample & compare.

Only this module imports gradio, and only inside :func:`build_app` and :func:`launch`, so the
rest of the package (and ``dreamguide --help``) works without it. Every handler turns bad input
into messages under the fields they belong to (:class:`~dreamguide.ui.forms.FieldErrors`) and
any other error into a message on the page; the app keeps running.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamguide.ui.forms import GENERAL, FieldErrors, SampleForm, TrainForm
from dreamguide.ui.views import error_html, grid_html, progress_html, summary_html

if TYPE_CHECKING:
    from dreamguide.ui.workspace import Comparison, Workspace

#: Modes ticked when the page opens: the base model, plain DreamBooth, consistency guidance, PR.
DEFAULT_MODES = ("cfg", "dreambooth", "consistency", "parallel-rescaled")
#: The value of the subject menu that means "my own photos".
MY_PHOTOS = "photos"
#: Prompt ideas for real models, ``{}`` = "<token> <class word>".
PROMPT_IDEAS = (
    "a photo of {} in the snow",
    "a {} on the beach",
    "a watercolor painting of {}",
    "a pencil sketch of {}",
    "a cartoon illustration of {}",
    "a {} in pixel art style",
)

CSS = """
.dg-error { color: #b91c1c; font-size: 0.88em; margin: -4px 2px 6px; white-space: pre-wrap; }
.dg-error-box:not(:has(.dg-error)) { display: none !important; }
.dg-grid table { border-collapse: collapse; }
.dg-grid th, .dg-grid td { padding: 4px 6px; text-align: center; vertical-align: top; }
.dg-grid thead th { font-family: monospace; }
.dg-grid img { width: var(--dg-cell, 128px); height: var(--dg-cell, 128px); object-fit: contain; display: block;
               margin: 0 auto; image-rendering: var(--dg-rendering, auto); }
.dg-grid .dg-pending { width: var(--dg-cell, 128px); color: #888; }
.dg-score { font-size: 0.8em; }
.dg-download { font-size: 0.72em; display: block; }
.dg-summary td, .dg-summary th { padding: 2px 10px; }
.dg-note, .dg-status { font-size: 0.85em; color: #555; }
.dg-progress progress { width: 45%; height: 14px; vertical-align: middle; }
"""


def _prompt_ideas(workspace: "Workspace", token: str | None, class_word: str | None) -> list[str]:
    if not token:
        return []
    subject = f"{token} {class_word}" if class_word else token
    if workspace.toy:
        from dreamguide.toyworld.prompts import PROMPT_SETS

        templates = [*PROMPT_SETS["stylized"], *PROMPT_SETS["background"], *PROMPT_SETS["recolor"]]
        return [t.format(subject) for t in templates]
    return [t.format(subject) for t in PROMPT_IDEAS]


def _use_button(workspace: "Workspace", subject: str) -> dict:
    """Label and state of the button that loads a toy subject's bundled adapter."""
    if workspace.toy and workspace.bundled_adapter(subject, "dreambooth") is not None:
        return {"value": "Use this subject's bundled adapter", "interactive": True}
    return {"value": "No bundled adapter for this subject: train one with Start training", "interactive": False}


def _subject_markdown(workspace: "Workspace") -> str:
    s = workspace.subject
    model = "the miniature world's bundled model" if workspace.toy else f"`{workspace.model}`"
    parts = [f"**Subject:** {s.name}"]
    if s.token:
        parts.append(f"token `{s.token}`")
    if s.class_word:
        parts.append(f"class word `{s.class_word}`")
    parts.append(f"{len(s.references)} reference photo(s)" if s.references else "no reference photos")
    return " · ".join(parts) + f" · model: {model}"


def _cell_style(comparison: "Comparison") -> str:
    """The grid's cell size: small toy-world images enlarged with crisp pixels, large images shrunk."""
    width = comparison.results[0].image.width if comparison.results else 256
    if width <= 64:
        return "--dg-cell: 128px; --dg-rendering: pixelated;"
    return f"--dg-cell: {min(256, width)}px;"


def build_app(workspace: "Workspace", log: Callable[[str], None] = print):
    """The page (a ``gradio.Blocks``) working on ``workspace``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from dreamguide import guidance
    from dreamguide.guidance import GRANULARITIES, NORMALIZATIONS, SCHEDULES, ConsistencyShaping, ParallelRescaling
    from dreamguide.sampling import SampleSettings

    toy = workspace.toy
    sample_defaults = SampleSettings(prompt="-")
    pr_defaults = ParallelRescaling()
    train_defaults = workspace.train_form_defaults()
    if toy:
        from dreamguide.toyworld.demo import DemoSettings

        default_steps = DemoSettings.steps
    else:
        default_steps = sample_defaults.steps

    def error_box(name: str):
        return gr.HTML("", elem_id=f"dg-error-{name}", elem_classes=["dg-error-box"])

    def run_safely(errors: dict[str, Any], fn: Callable[[], dict]) -> dict:
        """``fn()``'s outputs with every error box cleared, or the messages of its errors in their boxes."""
        cleared = {box: "" for box in errors.values()}
        try:
            return {**cleared, **fn()}
        except FieldErrors as error:
            return {**cleared, **_field_messages(errors, error.errors)}
        except Exception as error:  # noqa: BLE001 (the app keeps running; the trace goes to the log)
            log(traceback.format_exc())
            return {**cleared, errors[GENERAL]: error_html(f"unexpected error: {type(error).__name__}: {error}")}

    # Gradio copies every file it shows into its cache; files older than a day are deleted hourly
    # (the originals stay in the workspace's output folder).
    with gr.Blocks(title="dreamguide", delete_cache=(3600, 86400)) as app:
        gr.Markdown(
            "# dreamguide\n"
            "Personalize a subject, then sample the same seeds in several guidance modes side by side "
            "(rows: seeds, columns: modes) with the Consistency_p trace and the identity / text trade-off."
        )
        subject_line = gr.Markdown(_subject_markdown(workspace), elem_id="dg-subject")
        with gr.Tabs(selected="personalize") as tabs:
            # ---------------------------------------------------------------- Personalize
            with gr.Tab("Personalize", id="personalize"):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Subject")
                        choices = [(label, token) for token, label in workspace.toy_subjects()] if toy else []
                        choices.append(("my photos", MY_PHOTOS))
                        subject_choice = gr.Dropdown(choices, value=choices[0][1], label="Subject",
                                                     elem_id="dg-subject-choice", visible=toy)
                        subject_error = error_box("subject")
                        first = choices[0][1]
                        references = gr.Gallery(
                            [str(p) for p in workspace.toy_reference_files(first)] if toy else None,
                            label="Reference photos", columns=5, height=140, visible=toy, elem_id="dg-references")
                        use_subject = gr.Button(**_use_button(workspace, first), elem_id="dg-use-subject",
                                                visible=toy)
                        with gr.Group(visible=not toy) as photos_group:
                            photos = gr.File(label="Photos of the subject (3-6)", file_count="multiple",
                                             file_types=["image"], elem_id="dg-photos")
                            photos_error = error_box("photos")
                            captions = gr.Textbox(label="Captions (optional): one line per photo, in upload order; "
                                                  "each must contain the token; a blank line keeps the default",
                                                  lines=3, elem_id="dg-captions")
                            captions_error = error_box("captions")
                            token = gr.Textbox(train_defaults.token, label="Token", elem_id="dg-token")
                            token_error = error_box("token")
                            class_word = gr.Textbox(train_defaults.class_word, label="Class word (e.g. dog)",
                                                    elem_id="dg-class-word")
                            class_word_error = error_box("class_word")
                        with gr.Accordion("Load an adapter file (uses the token, class word and photos above)",
                                          open=not toy, elem_id="dg-load-adapter"):
                            lora_file = gr.File(label="LoRA (.safetensors, diffusers or Kohya keys)",
                                                file_types=[".safetensors"], elem_id="dg-lora")
                            lora_error = error_box("lora")
                            embeddings_file = gr.File(label="Token embeddings (.safetensors, optional)",
                                                      file_types=[".safetensors"], elem_id="dg-embeddings")
                            embeddings_error = error_box("embeddings")
                            load_adapter = gr.Button("Load adapter", elem_id="dg-load")
                            load_error = error_box("load")
                    with gr.Column():
                        gr.Markdown("### Fine-tune")
                        method = gr.Radio([("DreamBooth LoRA", "dreambooth"),
                                           ("DreamBooth LoRA + textual inversion", "dreambooth-ti"),
                                           ("DCO", "dco")], value=train_defaults.method, label="Method",
                                          elem_id="dg-method")
                        method_error = error_box("method")
                        with gr.Row():
                            train_steps = gr.Textbox(train_defaults.steps, label="Steps", elem_id="dg-train-steps")
                            lr = gr.Textbox(train_defaults.lr, label="Learning rate", elem_id="dg-lr")
                        train_steps_error, lr_error = error_box("train-steps"), error_box("lr")
                        with gr.Row():
                            rank = gr.Textbox(train_defaults.rank, label="LoRA rank", elem_id="dg-rank")
                            batch_size = gr.Textbox(train_defaults.batch_size, label="Batch size",
                                                    elem_id="dg-batch-size")
                            sample_every = gr.Textbox(train_defaults.sample_every, label="Sample every (steps; 0: off)",
                                                      elem_id="dg-sample-every")
                        rank_error, batch_size_error = error_box("rank"), error_box("batch_size")
                        sample_every_error = error_box("sample_every")
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="dg-train-start")
                            cancel = gr.Button("Cancel", elem_id="dg-train-cancel")
                            resume = gr.Button("Resume", elem_id="dg-train-resume")
                        train_error = error_box("train")
                        progress = gr.HTML(progress_html(None), elem_id="dg-train-progress")
                        losses = gr.LinePlot(x="step", y="loss", label="Loss", height=220, elem_id="dg-loss")
                        samples = gr.Gallery(label="Samples during training", columns=4, height=200,
                                             elem_id="dg-train-samples")
                        adapter_files = gr.File(label="Adapter files", file_count="multiple", interactive=False,
                                                elem_id="dg-adapter-files")
                        timer = gr.Timer(1.0, active=False)

            # ---------------------------------------------------------------- Sample & compare
            with gr.Tab("Sample & compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        s = workspace.subject
                        ideas_now = _prompt_ideas(workspace, s.token, s.class_word)
                        prompt = gr.Textbox(ideas_now[0] if ideas_now else "",
                                            label="Prompt (with the subject's token)",
                                            elem_id="dg-prompt")
                        prompt_error = error_box("prompt")
                        ideas = gr.Dropdown(ideas_now, value=None, label="Prompt ideas", elem_id="dg-ideas")
                        with gr.Row():
                            seeds = gr.Textbox("0,1", label="Seeds (0,1 or 0-3)", elem_id="dg-seeds")
                            steps = gr.Number(default_steps, precision=0, label="Steps", elem_id="dg-steps")
                        seeds_error, steps_error = error_box("seeds"), error_box("steps")
                        with gr.Row():
                            w_text = gr.Textbox(str(sample_defaults.w_text), label="w_text", elem_id="dg-w-text")
                            w_cons = gr.Textbox(str(sample_defaults.w_cons), label="w_cons", elem_id="dg-w-cons")
                        w_text_error, w_cons_error = error_box("w_text"), error_box("w_cons")
                        mode_names = list(guidance.MODES)
                        modes = gr.CheckboxGroup(
                            [(f"{name} (pr)" if name == "parallel-rescaled" else name, name) for name in mode_names],
                            value=list(DEFAULT_MODES), label="Guidance modes (one column each)", elem_id="dg-modes",
                            info="Hover a column header of the grid for what its mode does and which knob sets it.",
                        )
                        modes_error = error_box("modes")
                        with gr.Accordion("Parallel rescaling switches", open=False):
                            granularity = gr.Radio(list(GRANULARITIES), value=pr_defaults.granularity,
                                                   label="granularity")
                            normalization = gr.Radio(list(NORMALIZATIONS), value=pr_defaults.normalization,
                                                     label="normalization (none: consistency, zero: orthogonal)")
                            with gr.Row():
                                rescale = gr.Textbox(str(pr_defaults.rescale), label="rescale (lambda)",
                                                     elem_id="dg-pr-rescale")
                                eps = gr.Textbox(str(pr_defaults.eps), label="eps", elem_id="dg-pr-eps")
                        pr_error = error_box("pr")
                        shaping_defaults = ConsistencyShaping()
                        shaping_inputs: dict[str, Any] = {}
                        with gr.Accordion("Consistency shaping (schedule, window, the shaping modes' knobs)",
                                          open=False):
                            shaping_inputs["schedule"] = gr.Dropdown(list(SCHEDULES), value=shaping_defaults.schedule,
                                                                     label="schedule of w_cons")
                            with gr.Row():
                                for name in ("start", "stop", "floor", "pr_from"):
                                    shaping_inputs[name] = gr.Textbox(str(getattr(shaping_defaults, name)), label=name)
                            with gr.Row():
                                for name in ("spread_cap", "norm_bound", "magnitude_ratio"):
                                    shaping_inputs[name] = gr.Textbox("", label=f"{name} (blank: none)")
                            with gr.Row():
                                for name in ("magnitude_power", "parallel_target"):
                                    shaping_inputs[name] = gr.Textbox(str(getattr(shaping_defaults, name)), label=name)
                        shaping_error = error_box("shaping")
                        with gr.Accordion("Base and negative prompts", open=False):
                            base_prompt = gr.Textbox("", label="Base prompt (blank: the prompt with the token replaced "
                                                     "by the class word)")
                            negative_prompt = gr.Textbox(sample_defaults.negative_prompt, label="Negative prompt")
                        with gr.Row():
                            sample = gr.Button("Sample", variant="primary", elem_id="dg-sample")
                            tune_button = gr.Button("Tune w_cons", elem_id="dg-tune")
                        gr.Markdown("*Tune w_cons* runs `dreamguide tune` for the first ticked mode (its knob: "
                                    "w_cons, w_text or a shaping field) at small settings and puts the "
                                    "recommended value into that field.")
                        compare_error = error_box("compare")
                    with gr.Column(scale=2):
                        grid = gr.HTML("", elem_id="dg-grid")
                        summary = gr.HTML("", elem_id="dg-summary")
                        with gr.Row():
                            consistency_plot = gr.Image(label="Consistency_p per denoising step", type="filepath",
                                                        interactive=False, elem_id="dg-consistency-plot", scale=3)
                            tradeoff_plot = gr.Image(label="Trade-off: identity vs text alignment", type="filepath",
                                                     interactive=False, elem_id="dg-tradeoff-plot", scale=2)
                        tune_summary = gr.Markdown("", elem_id="dg-tune-summary")
                        tune_plot = gr.Image(label="Tune: identity vs text alignment per knob value",
                                             type="filepath", interactive=False, visible=False,
                                             elem_id="dg-tune-plot")
                        files = gr.File(label="Downloads: each image (its settings in the PNG metadata), the "
                                        "labelled grid, settings.json, trace.json, scores.csv", file_count="multiple",
                                        interactive=False, height=240, elem_id="dg-files")

        # -------------------------------------------------------------------- handlers
        subject_errors = {"subject": subject_error, GENERAL: subject_error}
        load_errors = {"lora": lora_error, "embeddings": embeddings_error, "token": token_error,
                       "class_word": class_word_error, "model": load_error, GENERAL: load_error}
        train_errors = {"photos": photos_error, "captions": captions_error, "token": token_error,
                        "class_word": class_word_error, "method": method_error, "steps": train_steps_error,
                        "lr": lr_error, "rank": rank_error, "batch_size": batch_size_error,
                        "sample_every": sample_every_error, GENERAL: train_error}
        sample_errors = {"prompt": prompt_error, "seeds": seeds_error, "steps": steps_error, "w_text": w_text_error,
                         "w_cons": w_cons_error, "modes": modes_error, "pr": pr_error, "shaping": shaping_error,
                         GENERAL: compare_error}

        def subject_outputs() -> dict:
            s = workspace.subject
            ideas_list = _prompt_ideas(workspace, s.token, s.class_word)
            return {subject_line: _subject_markdown(workspace),
                    prompt: ideas_list[0] if ideas_list else gr.skip(),
                    ideas: gr.Dropdown(choices=ideas_list, value=None)}

        def on_subject_choice(choice):
            if choice == MY_PHOTOS:
                return {references: gr.Gallery(visible=False), photos_group: gr.Group(visible=True),
                        use_subject: gr.Button(visible=False), subject_error: ""}
            from dreamguide.toyworld.subjects import get_subject

            s = get_subject(choice)
            return {references: gr.Gallery([str(p) for p in workspace.toy_reference_files(choice)], visible=True),
                    photos_group: gr.Group(visible=False), subject_error: "",
                    use_subject: gr.Button(**_use_button(workspace, choice), visible=True),
                    token: s.token, class_word: s.cls}

        subject_choice.change(on_subject_choice, subject_choice,
                              [references, photos_group, use_subject, subject_error, token, class_word])

        def on_use_subject(choice):
            def act():
                workspace.use_toy_subject(choice)
                return {**subject_outputs(), tabs: gr.Tabs(selected="compare")}

            return run_safely(subject_errors, act)

        use_subject.click(on_use_subject, subject_choice,
                          [subject_error, subject_line, prompt, ideas, tabs])

        def on_load_adapter(lora, embeddings, token_, class_word_, photos_):
            def act():
                workspace.load_uploaded(lora, embeddings, token_, class_word_, list(photos_ or []))
                return {**subject_outputs(), tabs: gr.Tabs(selected="compare")}

            return run_safely(load_errors, act)

        load_adapter.click(on_load_adapter, [lora_file, embeddings_file, token, class_word, photos],
                           [*set(load_errors.values()), subject_line, prompt, ideas, tabs])

        ideas.change(lambda idea: idea if idea else gr.skip(), ideas, prompt)

        # -- training
        def training_outputs() -> dict:
            job = workspace.job
            if job is None:
                return {progress: progress_html(None), timer: gr.Timer(active=False)}
            state = job.state()
            steps_done, loss_values = job.losses()
            step, images = job.latest_samples()
            out = {
                progress: progress_html(state),
                losses: _loss_frame(steps_done, loss_values),
                samples: [(str(p), f"step {step} · {p.parent.name.replace('-', ' ')} · {_image_caption(p)}")
                          for p in images] or None,
                timer: gr.Timer(active=state.live),
            }
            if not state.live:
                out[adapter_files] = [str(p) for p in job.files()] or None
            if state.status == "done":
                out.update(subject_outputs())
            return out

        training_views = [progress, losses, samples, timer, adapter_files, subject_line, prompt, ideas]

        def on_start(choice, photos_, captions_, token_, class_word_, method_, steps_, lr_, rank_, batch_, every_):
            def act():
                form = TrainForm(token=token_ or "", class_word=class_word_ or "", method=method_ or "",
                                 steps=steps_, lr=lr_, rank=rank_, batch_size=batch_, sample_every=every_)
                toy_subject = choice if toy and choice != MY_PHOTOS else None
                workspace.start_training(form, photos=list(photos_ or []), captions=captions_ or "",
                                         toy_subject=toy_subject)
                return {progress: progress_html(workspace.job.state()), timer: gr.Timer(active=True),
                        adapter_files: None}

            return run_safely(train_errors, act)

        start.click(on_start, [subject_choice, photos, captions, token, class_word, method, train_steps, lr, rank,
                               batch_size, sample_every],
                    [*set(train_errors.values()), progress, timer, adapter_files])

        def on_cancel():
            def act():
                if workspace.job is None or not workspace.job.cancel():
                    raise FieldErrors({GENERAL: "no training run in progress to cancel"})
                return {progress: progress_html(workspace.job.state())}

            return run_safely({GENERAL: train_error}, act)

        cancel.click(on_cancel, None, [train_error, progress])

        def on_resume():
            def act():
                if workspace.job is None:
                    raise FieldErrors({GENERAL: "no training run to resume; start one"})
                try:
                    workspace.job.resume()
                except ValueError as error:
                    raise FieldErrors({GENERAL: str(error)}) from None
                return {progress: progress_html(workspace.job.state()), timer: gr.Timer(active=True)}

            return run_safely({GENERAL: train_error}, act)

        resume.click(on_resume, None, [train_error, progress, timer])
        timer.tick(training_outputs, None, training_views)

        # -- sample and compare
        shaping_names = list(shaping_inputs)
        sample_inputs = [prompt, base_prompt, negative_prompt, seeds, steps, w_text, w_cons, modes, granularity,
                         normalization, rescale, eps, *shaping_inputs.values()]
        result_views = [grid, summary, consistency_plot, tradeoff_plot, files]

        def comparison_outputs(comparison: "Comparison") -> dict:
            return {
                grid: f'<div style="{_cell_style(comparison)}">{grid_html(comparison)}</div>',
                summary: summary_html(comparison),
                consistency_plot: str(comparison.consistency_p) if comparison.consistency_p else None,
                tradeoff_plot: str(comparison.tradeoff) if comparison.tradeoff else None,
                files: [str(p) for p in (comparison.files or comparison.images)] or None,
            }

        def sample_form(prompt_, base_, negative_, seeds_, steps_, w_text_, w_cons_, modes_, granularity_,
                        normalization_, rescale_, eps_, *shaping_values) -> SampleForm:
            """The sample form's values (``sample_inputs``) for the loaded subject."""
            s = workspace.subject
            return SampleForm(prompt=prompt_ or "", token=s.token, class_word=s.class_word, base_prompt=base_ or "",
                              negative_prompt=negative_ or "", seeds=seeds_ or "", steps=steps_, w_text=w_text_,
                              w_cons=w_cons_, modes=list(modes_ or []), pr_granularity=granularity_,
                              pr_normalization=normalization_, pr_rescale=rescale_, pr_eps=eps_,
                              shaping=dict(zip(shaping_names, shaping_values)))

        def on_sample(*values):
            form = sample_form(*values)
            cleared = {box: "" for box in set(sample_errors.values())}
            try:
                from dreamguide.ui.forms import sample_settings

                for comparison in workspace.compare_steps(sample_settings(form)):
                    yield {**cleared, **comparison_outputs(comparison)}
            except FieldErrors as error:
                yield {**cleared, **_field_messages(sample_errors, error.errors)}
            except Exception as error:  # noqa: BLE001 (the app keeps running; the trace goes to the log)
                log(traceback.format_exc())
                yield {**cleared, compare_error: error_html(f"unexpected error: {type(error).__name__}: {error}")}

        sample.click(on_sample, sample_inputs, [*set(sample_errors.values()), *result_views])

        knob_fields = {"w_text": w_text, "w_cons": w_cons, **shaping_inputs}

        def on_tune(*values):
            form = sample_form(*values)

            def act():
                outcome = workspace.tune(form)
                out = {tune_summary: outcome.summary(), tune_plot: gr.Image(str(outcome.plot), visible=True)}
                if outcome.field in knob_fields:
                    out[knob_fields[outcome.field]] = f"{outcome.value:g}"
                return out

            return run_safely(sample_errors, act)

        tune_button.click(on_tune, sample_inputs,
                   [*set(sample_errors.values()), tune_summary, tune_plot, *knob_fields.values()])
    return app


def _field_messages(boxes: dict[str, Any], errors: dict[str, str]) -> dict:
    """Each message in the box of its field (fields without a box: the general one)."""
    out: dict[Any, str] = {}
    for name, message in errors.items():
        box = boxes.get(name, boxes[GENERAL])
        out[box] = (out[box] + "\n" if out.get(box) else "") + error_html(message)
    return out


def _image_caption(path: Path) -> str:
    """``parallel-rescaled-seed0.png`` -> ``pr, seed 0``."""
    from dreamguide.ui.workspace import mode_label

    mode, _, seed = path.stem.rpartition("-seed")
    return f"{mode_label(mode)}, seed {seed}"


def _loss_frame(steps: list[int], losses: list[float]):
    import pandas as pd

    return pd.DataFrame({"step": steps, "loss": losses})


def launch(workspace: "Workspace", host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Serve the page; returns the Gradio app (``block=False``: without waiting, for tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(workspace)
    app.queue()
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(Path(workspace.output))],
               prevent_thread_lock=not block, css=CSS, ssr_mode=False, show_error=True, quiet=not block,
               footer_links=[])
    return app
