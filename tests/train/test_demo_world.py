"""The demo's synthetic world: deterministic, split by image, and answers that match the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from mmadapter.cli.demo import evaluation as demo_eval
from mmadapter.cli.demo import world

SIZE = 64


def test_scenes_and_images_are_deterministic():
    for index in range(20):
        first, second = world.make_scene(3, index), world.make_scene(3, index)
        assert first == second
        assert np.array_equal(np.asarray(world.render(first, SIZE)), np.asarray(world.render(second, SIZE)))
    # Another seed gives another world.
    assert [world.make_scene(3, i) for i in range(20)] != [world.make_scene(4, i) for i in range(20)]


def test_a_scene_does_not_depend_on_how_many_are_made():
    train, heldout = world.split_scenes(5, 30, 10)
    bigger_train, _ = world.split_scenes(5, 40, 10)
    assert bigger_train[:30] == train
    assert heldout == [world.make_scene(5, 30 + i) for i in range(10)]


def test_split_is_by_image():
    train, heldout = world.split_scenes(0, 200, 50)
    assert {s.index for s in train}.isdisjoint({s.index for s in heldout})
    train_pixels = {world.render(s, SIZE).tobytes() for s in train}
    assert not any(world.render(s, SIZE).tobytes() in train_pixels for s in heldout)


def test_every_attribute_value_occurs():
    scenes = [world.make_scene(0, i) for i in range(300)]
    assert {s.colour for s in scenes} == set(world.COLOURS)
    assert {s.shape for s in scenes} == set(world.SHAPES)
    assert {s.size for s in scenes} == set(world.SIZES)
    assert {s.count for s in scenes} == {1, 2, 3}
    assert {s.position for s in scenes} == {*world.POSITIONS, None}


@pytest.mark.parametrize("index", range(40))
def test_shape_centres_have_the_named_colour(index):
    """The pixel at each shape's centre is the scene's colour, and no shape colour is the background's."""
    scene = world.make_scene(11, index)
    pixels = np.asarray(world.render(scene, SIZE)).astype(int)
    assert len(scene.centres) == scene.count
    expected = np.array(world.COLOURS[scene.colour])
    for fx, fy in scene.centres:
        x, y = int(fx * SIZE), int(fy * SIZE)
        assert np.abs(pixels[y, x] - expected).max() <= 2, (scene, pixels[y, x])
    corner = pixels[0, 0]  # shapes keep a margin from the border
    assert min(np.abs(corner - np.array(c)).max() for c in world.COLOURS.values()) > 60


def test_single_shapes_sit_where_the_caption_says():
    for index in range(60):
        scene = world.make_scene(2, index)
        if scene.position is None:
            continue
        (x, y), (px, py) = scene.centres[0], world.POSITIONS[scene.position]
        assert abs(x - px) <= 0.05 + 1e-9 and abs(y - py) <= 0.05 + 1e-9


def test_several_shapes_do_not_overlap():
    for index in range(100):
        scene = world.make_scene(9, index)
        for i, a in enumerate(scene.centres):
            for b in scene.centres[i + 1 :]:
                assert np.hypot(a[0] - b[0], a[1] - b[1]) > 2 * scene.radius


def test_captions_and_answers_name_the_scene():
    for index in range(100):
        scene = world.make_scene(1, index)
        assert world.read_attributes(world.caption(scene)) == scene.attributes()
        asked = set()
        for attribute, question, answer in world.questions(scene):
            assert question in world.QUESTIONS[attribute]
            assert world.read_attributes(answer)[attribute] == scene.attributes()[attribute]
            asked.add(attribute)
        assert asked == {a for a, v in scene.attributes().items() if v is not None}


def test_caption_wording():
    single = world.Scene(0, "red", "circle", "large", 1, "left", ((0.25, 0.5),), 0.2, ((0, 0, 0), (0, 0, 0)), 0)
    several = world.Scene(0, "blue", "star", "small", 3, None, ((0.2, 0.2),) * 3, 0.1, ((0, 0, 0), (0, 0, 0)), 0)
    assert world.caption(single) == "a large red circle on the left"
    assert world.caption(several) == "three small blue stars"


def test_read_attributes_takes_the_first_mention_and_plurals():
    assert world.read_attributes("two red stars and a blue circle") == {
        "colour": "red",
        "shape": "star",
        "count": "two",
        "size": None,
        "position": None,
    }
    assert world.read_attributes("") == dict.fromkeys(world.ATTRIBUTES)


def test_instructions_are_unique_and_answer_in_world_words():
    items = world.instructions()
    assert len(items) >= 30
    assert len({q for q, _ in items}) == len(items)
    assert ("What colour do you get by mixing blue and yellow?", "green") in items


def test_scoring_counts_only_what_was_asked():
    scenes = [world.make_scene(0, i) for i in range(3)]
    probes = demo_eval.make_probes(scenes)
    perfect = [
        world.caption(scenes[p.image]) if p.attribute is None else world.answer(scenes[p.image], p.attribute)
        for p in probes
    ]
    result = demo_eval.score(probes, perfect, scenes)
    assert all(v == 1.0 for kind in demo_eval.KINDS for v in result[kind].values())
    assert result["counts"]["caption"]["colour"] == 3
    # A wrong colour in every text: colour drops to 0, and answers about other attributes are unaffected.
    wrong = {s.index: next(c for c in world.COLOURS if c != s.colour) for s in scenes}
    damaged = [
        text.replace(scenes[p.image].colour, wrong[scenes[p.image].index])
        for p, text in zip(probes, perfect, strict=True)
    ]
    result = demo_eval.score(probes, damaged, scenes)
    assert result["caption"]["colour"] == 0.0 and result["answer"]["colour"] == 0.0
    assert result["caption"]["shape"] == 1.0 and result["answer"]["count"] == 1.0
