"""``dreamguide tune``: the choice of a point (exact), a toy-world sweep end to end, resume, refusal of a folder
of other settings, the missing-backbone message, and ``sample --settings`` applying the result."""

from __future__ import annotations

import json
import math

import pytest

from dreamguide import tune as tune_module
from dreamguide.guidance import ConsistencyShaping, ParallelRescaling
from dreamguide.tune import TuneSettings, best_above_floor, choose, knee, load_tuned

# -- choosing a point -----------------------------------------------------------------------------

# (text alignment, identity) in knob order: a curve bending at its second point.
TEXT = [1.0, 0.9, 0.5, 0.0]
IDENTITY = [0.0, 0.8, 0.9, 1.0]


def test_knee_is_the_point_farthest_from_the_chord():
    # Chord from (1, 0) to (0, 1): x + y = 1; distances 0, 0.7/sqrt2, 0.4/sqrt2, 0.
    assert knee(TEXT, IDENTITY) == 1
    # Normalized axes: shifting and scaling either score does not move the knee.
    assert knee([10 * t + 3 for t in TEXT], [0.01 * i - 5 for i in IDENTITY]) == 1
    # Bending later: (1, 0), (0.6, 0.3), (0.2, 0.95), (0, 1): distances 0, 0.1/sqrt2, 0.15/sqrt2, 0.
    assert knee([1.0, 0.6, 0.2, 0.0], [0.0, 0.3, 0.95, 1.0]) == 2


def test_knee_ties_and_degenerate_curves():
    assert knee([0.0, 1.0, 2.0], [2.0, 1.0, 0.0]) == 0  # straight: every distance 0, the first point
    assert knee([1.0, 0.0], [0.0, 1.0]) == 0  # two points
    assert knee([0.0, 0.5, 1.0], [0.0, 1.0, 0.0]) == 1  # ends at equal identity: the chord is horizontal
    assert knee([1.0, 0.75, 0.25, 0.0], [0.0, 0.5, 1.0, 1.0]) == 1  # equal distances: the lower knob value
    assert knee([1.0, 0.5, 1.0], [0.0, 1.0, 0.0]) == 0  # ends coincide: no chord, the first point
    with pytest.raises(ValueError, match="at least two points"):
        knee([1.0], [0.0])


def test_identity_floor_picks_the_most_text_alignment_above_it():
    assert best_above_floor(TEXT, IDENTITY, 0.85) == 2
    assert best_above_floor(TEXT, IDENTITY, 0.8) == 1  # the floor itself counts
    assert best_above_floor(TEXT, IDENTITY, -1.0) == 0
    assert best_above_floor([0.5, 0.5], [0.2, 0.3], 0.0) == 1  # equal text: the higher identity
    with pytest.raises(ValueError, match=r"no swept point reaches identity 1.5: the highest is 1.0000"):
        best_above_floor(TEXT, IDENTITY, 1.5)
    points = [{"text_alignment": t, "identity": i} for t, i in zip(TEXT, IDENTITY)]
    assert choose(points) == (1, "knee")
    assert choose(points, 0.85) == (2, "identity-floor 0.85")


def test_settings_validate_values():
    assert TuneSettings().values == tune_module.DEFAULT_VALUES["w_cons"]
    assert TuneSettings(mode="pr", values=(3, 1)).values == (1.0, 3.0)
    assert TuneSettings(mode="norm-bounded").knob == "shaping.norm_bound"
    with pytest.raises(ValueError, match="at least two different"):
        TuneSettings(values=(1.0, 1.0))
    with pytest.raises(ValueError, match="spread_cap"):
        TuneSettings(mode="spread-capped", values=(-1.0, 1.0))


# -- the toy world end to end ----------------------------------------------------------------------

TINY = dict(values=(0.0, 1.5, 3.0), steps=2, seeds=(0,), prompts_per_set=1, batch_size=2)


@pytest.fixture(scope="module")
def bench():
    return tune_module.toyworld_workbench("sks", "dreambooth", prompts_per_set=1)


@pytest.fixture(scope="module")
def full_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-full")
    return out, tune_module.tune(bench, TuneSettings(**TINY), out, progress=False, log=lambda _: None)


def test_toyworld_tune_end_to_end(bench, full_run):
    out, record = full_run
    assert sorted(p.name for p in out.iterdir()) == ["points.jsonl", "run.json", "tune.json", "tune.png", "tuned.json"]
    assert [c[0] for c in bench.cases] == ["normal", "stylized"]
    points = json.loads((out / "tune.json").read_text())["points"]
    assert points == record["points"]
    assert [p["value"] for p in points] == [0.0, 1.5, 3.0]
    for p in points:
        assert p["images"] == 2 and set(p["sets"]) == {"normal", "stylized"}
        for key in ("text_alignment", "identity"):
            assert math.isclose(p[key], (p["sets"]["normal"][key] + p["sets"]["stylized"][key]) / 2, rel_tol=1e-12)
    index = knee([p["text_alignment"] for p in points], [p["identity"] for p in points])
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned["tune"]["value"] == points[index]["value"] == tuned["w_cons"]
    assert tuned["tune"]["chosen_by"] == "knee" and tuned["mode"] == "consistency" and tuned["w_text"] == 7.5
    assert load_tuned(out / "tuned.json") == {"modes": ("consistency",), "w_text": 7.5, "w_cons": tuned["w_cons"],
                                               "pr": ParallelRescaling(), "shaping": ConsistencyShaping()}


def test_resume_after_a_kill_gives_the_same_result(bench, full_run, tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    def kill(point):
        raise Killed

    out = tmp_path / "tune"
    with pytest.raises(Killed):
        tune_module.tune(bench, TuneSettings(**TINY), out, progress=False, on_point=kill, log=lambda _: None)
    assert len((out / "points.jsonl").read_text().splitlines()) == 1 and not (out / "tuned.json").exists()
    sampled = []
    original = tune_module.sample_point
    monkeypatch.setattr(tune_module, "sample_point", lambda b, s, v: sampled.append(v) or original(b, s, v))
    logged = []
    record = tune_module.tune(bench, TuneSettings(**TINY), out, progress=False, log=logged.append)
    assert sampled == [1.5, 3.0] and "1 of 3 knob values already done" in logged[0]
    assert record["points"] == full_run[1]["points"]
    assert (out / "tuned.json").read_text() == (full_run[0] / "tuned.json").read_text()
    # A finished folder: nothing is sampled again; a floor chooses anew from the stored points.
    sampled.clear()
    again = tune_module.tune(bench, TuneSettings(**TINY), out, progress=False, identity_floor=-1.0, log=lambda _: None)
    best = max(range(3), key=lambda i: again["points"][i]["text_alignment"])
    assert sampled == []
    assert again["chosen"] == {"index": best, "by": "identity-floor -1", "value": [0.0, 1.5, 3.0][best]}


def test_a_folder_of_other_settings_is_refused(bench, full_run):
    out = full_run[0]
    with pytest.raises(ValueError, match=r"holds a different tuning run \(changed: settings\).*another --output"):
        tune_module.tune(bench, TuneSettings(**{**TINY, "values": (0.0, 3.0)}), out, progress=False)


# -- real models: missing backbones -------------------------------------------------------------


def test_missing_backbone_is_reported_before_sampling(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from dreamguide import metrics, sampling
    from dreamguide.cli import main

    hint = "cannot load metric backbone dino = 'facebook/dino-vits16@refs/pr/1': it is not in the local hub cache"

    def missing(self, name, source, device, dtype):
        raise metrics.BackboneUnavailable(hint)

    def no_model(*args, **kwargs):
        raise AssertionError("the diffusion model was loaded before the metric backbones")

    monkeypatch.setattr(metrics._ClsEncoder, "__init__", missing)
    monkeypatch.setattr(sampling.Sampler, "from_pretrained", no_model)
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (8, 8)).save(refs / "0.png")
    code = main(["tune", "--model", "some/model", "--lora", "lora.safetensors", "--token", "<sks>", "--class-word",
                 "dog", "--references", str(refs), "--output", str(tmp_path / "out"), "--no-progress",
                 "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2
    assert "DINO (facebook/dino-vits16@refs/pr/1)" in error and "CLIP-T (openai/clip-vit-base-patch32)" in error
    assert "nothing was sampled" in error and hint in error
    assert not (tmp_path / "out").exists()


# -- using the result -----------------------------------------------------------------------------


def _tuned_file(path):
    data = {"mode": "pr", "w_text": 6.0, "w_cons": 1.25, "pr": {**ParallelRescaling().to_dict(), "rescale": 0.5},
            "shaping": {**ConsistencyShaping().to_dict(), "schedule": "linear-decrease"}, "tune": {"knob": "w_cons"}}
    path.write_text(json.dumps(data))
    return path


def test_load_tuned_checks_the_file(tmp_path):
    path = _tuned_file(tmp_path / "tuned.json")
    assert load_tuned(path) == {"modes": ("parallel-rescaled",), "w_text": 6.0, "w_cons": 1.25,
                                "pr": ParallelRescaling(rescale=0.5),
                                "shaping": ConsistencyShaping(schedule="linear-decrease")}
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "w_extra": 1}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['w_extra'\]"):
        load_tuned(path)
    path.write_text(json.dumps({**data, "shaping": {"stat": 0.5}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stat'\] in 'shaping' of"):
        load_tuned(path)
    with pytest.raises(FileNotFoundError, match="dreamguide tune"):
        load_tuned(tmp_path / "none.json")


def test_sample_settings_flag_applies_the_file_and_flags_win(tmp_path):
    from dreamguide.cli import build_parser
    from dreamguide.cli.sample import settings_from_args

    path = _tuned_file(tmp_path / "tuned.json")
    base = ["sample", "--model", "m", "--prompt", "a sks ball", "--token", "sks", "--class-word", "ball",
            "--settings", str(path)]
    settings = settings_from_args(build_parser(base).parse_args(base))
    assert (settings.modes, settings.w_text, settings.w_cons) == (("parallel-rescaled",), 6.0, 1.25)
    assert settings.pr == ParallelRescaling(rescale=0.5)
    assert settings.shaping == ConsistencyShaping(schedule="linear-decrease")
    flags = [*base, "--w-cons", "2", "--pr-eps", "0.001", "--modes", "consistency"]
    settings = settings_from_args(build_parser(flags).parse_args(flags))
    assert (settings.modes, settings.w_text, settings.w_cons) == (("consistency",), 6.0, 2.0)
    assert settings.pr == ParallelRescaling(rescale=0.5, eps=0.001)


def test_shaping_flag_merges_over_the_file_and_names_itself_in_errors(tmp_path):
    from dreamguide.cli import build_parser
    from dreamguide.cli.sample import settings_from_args

    base = ["sample", "--model", "m", "--prompt", "a sks ball", "--token", "sks", "--class-word", "ball"]
    flags = [*base, "--settings", str(_tuned_file(tmp_path / "tuned.json")), "--shaping", "floor=0.25, stop=0.9"]
    settings = settings_from_args(build_parser(flags).parse_args(flags))
    assert settings.shaping == ConsistencyShaping(schedule="linear-decrease", floor=0.25, stop=0.9)
    flags = [*base, "--shaping", "schedule=cosine-decrease,norm_bound=none,spread_cap=0.5"]
    settings = settings_from_args(build_parser(flags).parse_args(flags))
    assert settings.shaping == ConsistencyShaping(schedule="cosine-decrease", spread_cap=0.5)
    flags = [*base, "--shaping", "schedule=linear-decrease,floor=0.25,spread_cap=NONE"]
    assert settings_from_args(build_parser(flags).parse_args(flags)).shaping == ConsistencyShaping(
        schedule="linear-decrease", floor=0.25)
    for text, match in [
        ("floor", r"--shaping 'floor': shaping key 'floor' has no value in 'floor'; write floor=VALUE, e\.g\."),
        ("schedule=", r"shaping key 'schedule' has no value"),
        ("tau=1", r"unknown shaping key 'tau' in 'tau=1'; valid keys: schedule, start, stop, floor"),
        (" ", r"no shaping settings given; write key=value pairs, e\.g\. schedule=cosine-decrease"),
        ("schedule=linear-decrease,", r"empty item in 'schedule=linear-decrease,' \(a stray comma\?\)"),
        ("floor=0.2,floor=0.3", r"'floor' is given twice"),
        ("floor=high", r"shaping floor='high' must be a number, e\.g\. floor=0\.5"),
        ("start=none", r"shaping start='none' must be a number, e\.g\."),
        ("norm_bound=x", r"norm_bound='x' must be a number \(or none for no cap\)"),
        ("schedule=linear-decrease,floor=2", r"--shaping '.*': ConsistencyShaping\.floor is a fraction"),
        ("floor=0.5", r"floor \(0\.5\) acts only with a schedule that moves"),
        ("start=0.5,stop=0.2", r"start \(0\.5\) must be below stop \(0\.2\)"),
        ("floor=nan", r"floor must be a finite number, got nan"),
        ("schedule=cosine", r"unknown consistency schedule 'cosine'"),
    ]:
        flags = [*base, "--shaping", text]
        with pytest.raises(ValueError, match=match):
            settings_from_args(build_parser(flags).parse_args(flags))


def test_tune_sweeps_with_the_shaping_flag(tmp_path, monkeypatch):
    from dreamguide import tune as tune_module
    from dreamguide.cli import main

    seen = {}
    monkeypatch.setattr(tune_module, "toyworld_workbench", lambda *args, **kwargs: "bench")
    monkeypatch.setattr(tune_module, "tune", lambda bench, settings, output, **kwargs: seen.update(settings=settings))
    assert main(["tune", "--toyworld-subject", "sks", "--values", "1.5,3,6", "--shaping",
                 "schedule=cosine-decrease,floor=0.25", "--output", str(tmp_path / "t"), "--threads", "1"]) == 0
    settings = seen["settings"]
    assert settings.shaping == ConsistencyShaping(schedule="cosine-decrease", floor=0.25)
    assert settings.values == (1.5, 3.0, 6.0) and settings.knob == "w_cons"
    # what run.json and tuned.json record
    assert settings.to_dict()["shaping"]["floor"] == 0.25
    assert settings.guide_kwargs(3.0)["shaping"].weight(3.0, 1.0) == 0.75


def test_tune_refuses_a_shaping_key_that_is_the_swept_knob(tmp_path, capsys):
    from dreamguide.cli import main

    code = main(["tune", "--toyworld-subject", "sks", "--mode", "spread-capped", "--shaping", "spread_cap=0.3",
                 "--output", str(tmp_path / "t")])
    assert code == 2
    assert ("shaping.spread_cap is the knob mode 'spread-capped' sweeps, so its values set it: leave it out of "
            "the shaping switches and give them as the sweep's values, e.g. --values") in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_sample_settings_end_to_end_on_the_toy_world(tmp_path):
    from dreamguide.cli import main
    from dreamguide.toyworld.model import BUNDLED_MODEL_DIR
    from dreamguide.toyworld.personalize import LORA_FILE, adapter_dir

    path = _tuned_file(tmp_path / "tuned.json")
    out = tmp_path / "samples"
    lora = adapter_dir("sks", "dreambooth") / LORA_FILE
    assert main(["sample", "--model", str(BUNDLED_MODEL_DIR), "--lora", str(lora),
                 "--token", "sks", "--class-word", "ball", "--prompt", "a sks ball in the snow", "--settings",
                 str(path), "--steps", "2", "--no-progress", "--output", str(out), "--device", "cpu"]) == 0
    recorded = json.loads((out / "settings.json").read_text())["settings"]
    assert recorded["modes"] == ["parallel-rescaled"] and recorded["w_cons"] == 1.25 and recorded["w_text"] == 6.0
    assert recorded["pr"]["rescale"] == 0.5 and recorded["shaping"]["schedule"] == "linear-decrease"


def test_top_level_help_lists_tune_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom dreamguide.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "tune" in done.stdout and done.stdout.strip().endswith("torch not imported"), done.stdout + done.stderr
