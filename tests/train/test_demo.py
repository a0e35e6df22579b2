"""`mmadapter demo`, shortened: the untrained adapter is exactly the base model, and training lifts held-out accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from mmadapter.cli.demo import world
from mmadapter.cli.demo.app import SCALES, DemoOptions, DemoScale, run_demo
from mmadapter.cli.main import main

#: A shortened run, what CI can afford: 40 % of the full run's steps on a quarter of its images (~75 s of CPU).
#: The attributes a short run learns first.
EARLY = ("shape", "count", "size")
SHORT = DemoScale(train_images=400, heldout_images=40, questions_per_image=3, caption_steps=500, instruction_steps=350)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        assert run_demo(DemoOptions(output=output, scale=SHORT, threads=1)) == 0
    finally:
        torch.set_num_threads(threads)  # the demo sets the process's threads; later tests run with the default
    return output, json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
def test_shortened_demo_lifts_held_out_accuracy(demo_run):
    output, metrics = demo_run
    assert metrics["zero_init_max_abs_difference"] == 0.0
    untrained, trained = metrics["untrained"], metrics["trained"]
    # Chance is 1/6 for colour and 1/5 for shape; the untrained adapter is the image-blind base model.
    for kind in ("caption", "answer"):
        for attribute in ("colour", "shape"):
            assert untrained[kind][attribute] < 0.4, (kind, attribute, untrained[kind][attribute])

    # The shortened run is far from the full run's accuracy (>= 90 % on every attribute), but must clearly have
    # learned to see. A short run learns size, count and shape first (colour and position last, see docs/demo.md).
    # Measured on it (2-core VM, seed 0, one thread), untrained -> trained: captions shape 20 -> 45 %, count
    # 33 -> 80 %, size 55 -> 95 %; answers shape 20 -> 55 %, count 30 -> 78 %, size 40 -> 93 % (mean lifts 0.38
    # and 0.45). Thresholds are about half of them.
    def early_lift(kind):
        return sum(trained[kind][a] - untrained[kind][a] for a in EARLY) / len(EARLY)

    assert early_lift("caption") > 0.2, (trained["caption"], untrained["caption"])
    assert early_lift("answer") > 0.2, (trained["answer"], untrained["answer"])
    assert metrics["trained"]["counts"]["caption"]["colour"] == SHORT.heldout_images


@pytest.mark.slow
def test_demo_writes_its_outputs(demo_run):
    output, metrics = demo_run
    for name in (
        "metrics.json",
        "results.json",
        "README.md",
        "loss_curves.png",
        "accuracy.png",
        "examples/examples.txt",
    ):
        assert (output / name).is_file(), name
    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "mmadapter_config.json").read_text())["adapter"]["method"] == "llama-adapter-v2"
    assert len(metrics["examples"]) == 4 and metrics["wall_time_seconds"] > 0
    lines = (output / "examples" / "examples.txt").read_text().splitlines()
    image, question = lines[0].split("\t")
    assert (output / "examples" / image).is_file() and question


@pytest.mark.slow
def test_saved_adapter_answers_like_the_demo(demo_run):
    """The adapter folder reloads through the serving loader and repeats the demo's greedy answers."""
    from mmadapter.cli.demo.assets import ASSETS_DIR, LANGUAGE_MODEL_DIR
    from mmadapter.serve.chat import ChatTurn, stream_turn
    from mmadapter.serve.generate import TextDelta
    from mmadapter.serve.loader import load_served_model
    from mmadapter.vision.images import load_image

    output, metrics = demo_run
    served = load_served_model(ASSETS_DIR / LANGUAGE_MODEL_DIR, output / "adapter")
    example = metrics["examples"][0]
    question, expected = example["turns"][1]
    turn = ChatTurn(question, [], load_image(example["image"]), served.defaults.replace(temperature=0.0))
    with torch.no_grad():
        answer = "".join(e.text for e in stream_turn(served, turn) if isinstance(e, TextDelta))
    assert answer.strip() == expected


def test_scales_and_cli_are_wired(capsys):
    assert SCALES["quick"].caption_steps < SCALES["full"].caption_steps
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0  # argparse exits 2 for an unknown command
    assert "--quick" in capsys.readouterr().out
    assert set(world.ATTRIBUTES) == {"colour", "shape", "count", "size", "position"}


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ([3.0, 5.0], 2),  # an idle 2-core machine: both cores
        ([95.0, 4.0], 1),  # another process busy on one core: leave it alone
        ([30.0, 20.0], 1),  # half a core in use by others: one thread
        ([100.0, 100.0], 1),  # everything busy: still one
        ([0.0] * 16, 4),  # a big idle machine: the tiny model gains little beyond four
    ],
)
def test_default_threads_uses_the_idle_cores(monkeypatch, usage, expected):
    from mmadapter.cli.demo import app

    monkeypatch.setattr(app.psutil, "cpu_percent", lambda interval, percpu: usage)
    monkeypatch.setattr(app.os, "sched_getaffinity", lambda pid: set(range(len(usage))), raising=False)
    assert app.default_threads() == expected


def test_default_threads_counts_only_the_cores_it_may_run_on(monkeypatch):
    from mmadapter.cli.demo import app

    monkeypatch.setattr(app.psutil, "cpu_percent", lambda interval, percpu: [0.0, 0.0, 100.0, 100.0])
    monkeypatch.setattr(app.os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    assert app.default_threads() == 1
