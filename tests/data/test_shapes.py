"""vpd_shapes: determinism, and labels/depth/text that agree with the scene geometry."""
import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data import fixtures
from vpd_jax.data import shapes
from vpd_jax.data.builders import VpdShapes
from vpd_jax.data.class_names import NYU_SCENE_CLASSES

CONFIG = shapes.ShapesConfig()
SCENES = [shapes.render_scene((7, i), CONFIG, image_id=i) for i in range(24)]


def pixel_rays(scene):
    h, w = scene.depth.shape
    cam = scene.camera
    v = np.arange(h)[:, None] + 0.5
    u = np.arange(w)[None, :] + 0.5
    return np.broadcast_to((u - cam.cx) / cam.focal, (h, w)), np.broadcast_to(-(v - cam.cy) / cam.focal, (h, w))


def background_depth(scene):
    """Depth of the empty room: the floor where it is nearer than the wall, else the wall."""
    cam = scene.camera
    v = np.arange(scene.depth.shape[0])[:, None] + 0.5
    with np.errstate(divide="ignore"):
        floor = np.where(v > cam.cy, cam.focal * cam.height_m / (v - cam.cy), np.inf)
    return np.broadcast_to(np.minimum(floor, cam.wall_distance_m), scene.depth.shape)


def test_same_seed_same_bytes_and_other_seeds_differ():
    a, b = shapes.render_scene((7, 3), CONFIG, 3), SCENES[3]
    for field in ("image", "label", "depth", "instance"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert a.objects == b.objects and a.camera == b.camera
    assert [p for p, _ in a.phrases] == [p for p, _ in b.phrases]
    assert SCENES[3].image.tobytes() != SCENES[4].image.tobytes()
    assert shapes.render_scene((8, 3), CONFIG, 3).image.tobytes() != a.image.tobytes()


@pytest.mark.parametrize("scene", SCENES[:8], ids=lambda s: s.room)
def test_dtypes_and_shapes(scene):
    h, w = CONFIG.height, CONFIG.width
    assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
    assert scene.label.shape == (h, w) and scene.label.dtype == np.uint8
    assert scene.depth.shape == (h, w) and scene.depth.dtype == np.float32
    assert scene.room in NYU_SCENE_CLASSES and NYU_SCENE_CLASSES[scene.scene_class] == scene.room


def test_floor_and_wall_depth_follow_the_camera():
    for scene in SCENES:
        cam, depth, label = scene.camera, scene.depth.astype(np.float64), scene.label
        rows = np.broadcast_to(np.arange(depth.shape[0])[:, None] + 0.5, depth.shape)
        floor = label == shapes.FLOOR
        assert floor.any()
        np.testing.assert_allclose(depth[floor], cam.focal * cam.height_m / (rows[floor] - cam.cy), rtol=1e-6)
        np.testing.assert_allclose(depth[label == shapes.WALL], cam.wall_distance_m, rtol=1e-6)
        # Above the horizon there is only wall; the floor is wherever it is nearer than the wall.
        assert (label[rows < cam.cy] == shapes.WALL).all()
        background = label <= shapes.FLOOR
        np.testing.assert_array_equal(floor[background], (background_depth(scene) < cam.wall_distance_m)[background])


def test_objects_are_in_front_of_what_they_hide_and_labels_match_instances():
    for scene in SCENES:
        on_object = scene.instance >= 0
        assert (scene.depth[on_object] < scene.camera.wall_distance_m).all()
        assert (scene.depth[on_object] <= background_depth(scene)[on_object] + 1e-6).all()
        for k, obj in enumerate(scene.objects):
            assert (scene.label[scene.instance == k] == shapes.SEMANTIC_CLASSES.index(obj.shape)).all()
        assert set(np.unique(scene.label[~on_object])) <= {shapes.WALL, shapes.FLOOR}
        assert 0 not in scene.label  # raw 0 ("other") is never drawn: every pixel has a class


def test_sphere_pixels_lie_on_the_sphere():
    checked = 0
    for scene in SCENES:
        dx, dy = pixel_rays(scene)
        for k, obj in enumerate(scene.objects):
            if obj.shape != "sphere":
                continue
            sel = scene.instance == k
            t = scene.depth[sel].astype(np.float64)
            x, z = obj.position_m
            centre = np.array([x, -scene.camera.height_m + obj.size_m, z])
            points = np.stack([t * dx[sel], t * dy[sel], t], axis=-1)
            np.testing.assert_allclose(np.linalg.norm(points - centre, axis=-1), obj.size_m, rtol=2e-5, atol=2e-5)
            checked += 1
    assert checked > 0


def test_every_referring_expression_names_exactly_one_visible_object():
    left_right = 0
    for scene in SCENES:
        owners = {}
        for k, obj in enumerate(scene.objects):
            mask = scene.instance == k
            assert mask.sum() >= 25
            for sentence in obj.sentences:
                assert sentence not in owners, f"{sentence!r} names two objects"
                owners[sentence] = k
                assert obj.colour in sentence or obj.shape in sentence
                for word in shapes.SHAPES + tuple(shapes.COLOURS):
                    if f" {word}" in sentence:
                        assert word in (obj.shape, obj.colour), f"{sentence!r} does not describe {obj}"
            twins = [j for j, o in enumerate(scene.objects) if (o.shape, o.colour) == (obj.shape, obj.colour)]
            if len(twins) == 2:
                other = twins[1] if twins[0] == k else twins[0]
                mine = np.nonzero(mask)[1].mean()
                theirs = np.nonzero(scene.instance == other)[1].mean()
                side = "left" if mine < theirs else "right"
                assert all(f"{side}" in s for s in obj.sentences)
                left_right += 1
    assert left_right > 0  # the set exercises the left/right rule


def test_phrase_masks_are_unions_of_what_they_name():
    for scene in SCENES:
        for phrase, mask in scene.phrases:
            words = phrase.split()
            if phrase in ("wall", "floor"):
                expected = scene.label == shapes.SEMANTIC_CLASSES.index(phrase)
            else:
                members = [k for k, o in enumerate(scene.objects)
                           if o.shape == words[-1] and (len(words) == 1 or o.colour == words[0])]
                expected = np.isin(scene.instance, members)
            np.testing.assert_array_equal(mask, expected, err_msg=phrase)


def test_builder_matches_the_generator_and_is_deterministic(tmp_path):
    builders = [fixtures.prepare(VpdShapes(config="small", data_dir=str(tmp_path / d))) for d in ("a", "b")]
    records = [sorted(glob.glob(os.path.join(b.data_dir, "*.tfrecord*"))) for b in builders]
    assert len(records[0]) >= 2
    for first, second in zip(*records):
        with open(first, "rb") as f1, open(second, "rb") as f2:
            assert f1.read() == f2.read()
    cfg = builders[0].builder_config
    expected = dict(shapes.iter_scenes(cfg.seed, "validation", cfg.num_validation, cfg.shapes))
    examples = list(tfds.as_numpy(builders[0].as_dataset(split="validation")))
    assert len(examples) == cfg.num_validation == builders[0].info.splits["validation"].num_examples
    for e in examples:
        scene = expected[e["image/id"]]
        np.testing.assert_array_equal(e["image"], scene.image)
        np.testing.assert_array_equal(e["label"][..., 0], scene.label)
        assert e["depth"].dtype == np.float32 and e["depth"].tobytes() == scene.depth.tobytes()
        assert e["scene"].decode() == scene.room and e["scene_class"] == scene.scene_class
        sentences = e["objects"]["refexp"]["raw"].to_list()  # ragged, as in ref_coco
        for k, obj in enumerate(scene.objects):
            np.testing.assert_array_equal(e["objects"]["mask"][k, ..., 0], scene.instance == k)
            assert [s.decode() for s in sentences[k]] == list(obj.sentences)
            assert e["objects"]["id"][k] == obj.id
        assert [p.decode() for p in e["phrases"]["raw"]] == [p for p, _ in scene.phrases]
