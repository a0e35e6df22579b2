"""The demo's training files weight single shapes, and its published figures are one table, not copies."""

from __future__ import annotations

import json
from pathlib import Path

from mmadapter.cli.demo import world
from mmadapter.cli.demo.app import POSITION_REPEATS
from mmadapter.cli.demo.data import write_demo_data
from mmadapter.cli.demo.report import accuracy_table, markdown_table, time_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "demo.json"


def test_single_shape_scenes_are_repeated_in_captions_and_questions(tmp_path):
    train, heldout = world.split_scenes(3, 12, 2)
    data = write_demo_data(
        tmp_path,
        train,
        heldout,
        image_size=32,
        questions_per_image=2,
        instruction_repeats=1,
        position_repeats=3,
        seed=3,
    )
    captions = [json.loads(line) for line in data.captions.read_text().splitlines()]
    expected = [f"images/{s.index:05d}.png" for s in train for _ in range(3 if s.count == 1 else 1)]
    assert [row["image"] for row in captions] == expected
    singles = sum(s.count == 1 for s in train)
    assert 0 < singles < len(train)
    assert len(json.loads(data.vqa.read_text())) == 2 * (len(train) + 2 * singles)
    assert len(data.train_images) == len(train)  # each picture rendered once, however often it is used
    assert POSITION_REPEATS > 1


def test_accuracy_table_reads_the_metrics():
    untrained = {"caption": {a: 0.2 for a in world.ATTRIBUTES}, "answer": {a: 0.25 for a in world.ATTRIBUTES}}
    trained = {"caption": {a: 0.955 for a in world.ATTRIBUTES}, "answer": {"colour": 0.9}}
    table = accuracy_table(untrained, trained)
    assert table["rows"][0] == ["colour", "20.0 %", "95.5 %", "25.0 %", "90.0 %"]
    assert table["rows"][4] == ["position (single shapes)", "20.0 %", "95.5 %", "25.0 %", ""]
    lines = markdown_table(table)
    assert (
        lines[1] == "| --- | ---: | ---: | ---: | ---: |"
        and lines[2] == "| colour | 20.0 % | 95.5 % | 25.0 % | 90.0 % |"
    )
    steps = {"a": {"wall_seconds": 1.4, "cpu_seconds": 1.0}, "b": {"wall_seconds": 2.4, "cpu_seconds": 2.2}}
    assert time_table(steps)["rows"][-1] == ["total", "4", "3"]


def readme_demo_table() -> list[list[str]]:
    """The cells of the first table after the README's demo heading (separator row left out)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## The embedded demo"))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().strip("*").strip() for cell in line.strip().strip("|").split("|")]
        if not all(set(cell) <= set("-: ") for cell in cells):
            rows.append(cells)
    return rows


def test_readme_demo_table_is_the_committed_run():
    """README.md is read on GitHub as plain markdown, so its table is text: it must equal bench/results/demo.json,
    which the docs render (`<!-- bench-table: demo.json#accuracy -->`) and which a demo run writes as results.json."""
    table = json.loads(RESULTS.read_text())["tables"]["accuracy"]
    assert readme_demo_table() == [table["columns"], *table["rows"]]


def test_committed_run_meets_the_demo_targets():
    document = json.loads(RESULTS.read_text())
    assert document["command"] == "mmadapter demo"
    for row in document["tables"]["accuracy"]["rows"]:
        untrained = [float(row[i].removesuffix(" %")) for i in (1, 3)]
        trained = [float(row[i].removesuffix(" %")) for i in (2, 4)]
        assert min(trained) >= 90.0, row
        if row[0] in ("colour", "shape", "position (single shapes)"):  # chance: 1/6, 1/5, 1/5
            assert max(untrained) < 40.0, row
