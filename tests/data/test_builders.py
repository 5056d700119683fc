"""TFDS builders over tiny fixture trees in the real layouts: contents, dtypes, shapes, bad inputs."""
import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tests.data import fixtures
from tests.helpers.shared_data import shared_vpd_data
from vpd_jax.data.builders import Ade20k, BadInputError, NyuDepthV2Bts, Phrasecut
from vpd_jax.data.builders.nyu_depth_v2_bts import read_split_list
from vpd_jax.data.builders.phrasecut import REFERENCE_EXCLUDED_IMAGE_IDS, polygon_mask
from vpd_jax.data.class_names import NYU_SCENE_CLASSES, nyu_scene_class_id


def build(cls, tmp_path, manual_dir, **kwargs):
    return fixtures.prepare(cls(data_dir=str(tmp_path / "tfds"), **kwargs), str(manual_dir))


def read_all(builder, split, decoders=None):
    return list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))


# --------------------------------------------------------------------------------------------------
# ade20k
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_ade20k_builds_from_folder_or_zip(tmp_path, as_zip):
    manual = tmp_path / "manual"
    labels = fixtures.write_ade20k(str(manual), as_zip=as_zip)
    builder = build(Ade20k, tmp_path, manual)
    assert {s: builder.info.splits[s].num_examples for s in ("train", "validation")} == {"train": 3, "validation": 2}
    for split, folder in (("train", "training"), ("validation", "validation")):
        examples = read_all(builder, split)
        assert sorted(e["file_name"].decode() for e in examples) == sorted(f"{s}.jpg" for s in labels[folder])
        for e in examples:
            stem = e["file_name"].decode()[:-4]
            assert e["image"].dtype == np.uint8 and e["image"].shape == (*labels[folder][stem].shape, 3)
            assert e["label"].dtype == np.uint8 and e["label"].shape == (*labels[folder][stem].shape, 1)
            np.testing.assert_array_equal(e["label"][..., 0], labels[folder][stem])


def test_ade20k_stores_the_original_jpeg_bytes(tmp_path):
    manual = tmp_path / "manual"
    fixtures.write_ade20k(str(manual))
    builder = build(Ade20k, tmp_path, manual)
    for e in read_all(builder, "train", decoders={"image": tfds.decode.SkipDecoding()}):
        name = e["file_name"].decode()
        with open(manual / "ADEChallengeData2016" / "images" / "training" / name, "rb") as f:
            assert e["image"] == f.read()


def _ade_break(manual, problem):
    """Damages the first training pair; returns (the file the error must name, a phrase of the problem)."""
    root = manual / "ADEChallengeData2016"
    image = root / "images" / "training" / "ADE_train_00000001.jpg"
    label = root / "annotations" / "training" / "ADE_train_00000001.png"
    if problem == "unreadable":
        image.write_bytes(b"\xff\xd8 this is not a jpeg")
        return image, "unreadable image"
    if problem == "size":
        Image.fromarray(np.ones((10, 10), np.uint8)).save(label)
        return label, "differs from image size"
    if problem == "range":
        values = np.asarray(Image.open(label)).copy()
        values[3, 4] = 151
        Image.fromarray(values).save(label)
        return label, "out of range 0..150: max 151"
    if problem == "missing":
        label.unlink()
        return label, "file is missing"
    raise ValueError(problem)


@pytest.mark.parametrize("problem", ["unreadable", "size", "range", "missing"])
def test_ade20k_bad_input_raises_naming_the_file(tmp_path, problem):
    manual = tmp_path / "manual"
    fixtures.write_ade20k(str(manual))
    path, message = _ade_break(manual, problem)
    with pytest.raises(BadInputError, match=message) as info:
        build(Ade20k, tmp_path, manual)
    assert str(path) in str(info.value)


def test_ade20k_skip_policy_skips_and_counts_in_one_warning(tmp_path, caplog):
    manual = tmp_path / "manual"
    fixtures.write_ade20k(str(manual))
    _ade_break(manual, "range")
    root = manual / "ADEChallengeData2016"
    (root / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        builder = build(Ade20k, tmp_path, manual, on_bad_input="skip")
    assert builder.info.splits["train"].num_examples == 1
    assert builder.info.splits["validation"].num_examples == 2
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1
    assert "skipped 2 bad example(s)" in warnings[0]
    assert "ADE_train_00000001.png" in warnings[0] and "ADE_train_00000002.jpg" in warnings[0]


# --------------------------------------------------------------------------------------------------
# nyu_depth_v2_bts
# --------------------------------------------------------------------------------------------------
def test_nyu_bts_builds_with_depth_in_mm_and_vpd_scene_classes(tmp_path):
    manual = tmp_path / "manual"
    written = fixtures.write_nyu_bts(str(manual))
    builder = build(NyuDepthV2Bts, tmp_path, manual)
    # study_room -> study, office_kitchen -> kitchen (docs/reference.md, "Depth scene classes")
    expected_class = {"kitchen_0028b": 6, "study_room_0005b": 3, "office_kitchen_0001a": 6, "bathroom": 1,
                      "living_room": 2}
    for split in ("train", "test"):
        examples = read_all(builder, split)
        assert len(examples) == len(written[split])
        for e in examples:
            scene = e["scene"].decode()
            rgb = e["file_name"].decode().replace(f"{scene}_", f"{scene}/", 1)
            assert e["image"].shape == (480, 640, 3) and e["image"].dtype == np.uint8
            assert e["depth"].shape == (480, 640, 1) and e["depth"].dtype == np.uint16
            np.testing.assert_array_equal(e["depth"][..., 0], written[split][rgb])
            assert e["scene_class"] == expected_class[scene]


def _nyu_break(manual, problem):
    sync = manual / "sync" / "kitchen_0028b"
    if problem == "missing":
        (sync / "sync_depth_00046.png").unlink()
        return sync / "sync_depth_00046.png", r"file is missing \(listed in .*nyu_train_list.txt:2\)"
    if problem == "unreadable":
        (sync / "rgb_00045.jpg").write_bytes(b"not an image")
        return sync / "rgb_00045.jpg", "unreadable image"
    if problem == "size":
        Image.fromarray(np.zeros((240, 320), np.uint16)).save(sync / "sync_depth_00045.png")
        return sync / "sync_depth_00045.png", "differs from image size"
    if problem == "8bit":
        Image.fromarray(np.zeros((480, 640), np.uint8)).save(sync / "sync_depth_00045.png")
        return sync / "sync_depth_00045.png", "16-bit PNG"
    raise ValueError(problem)


@pytest.mark.parametrize("problem", ["missing", "unreadable", "size", "8bit"])
def test_nyu_bts_bad_input_raises_naming_the_file(tmp_path, problem):
    manual = tmp_path / "manual"
    fixtures.write_nyu_bts(str(manual))
    path, message = _nyu_break(manual, problem)
    with pytest.raises(BadInputError, match=message) as info:
        build(NyuDepthV2Bts, tmp_path, manual)
    assert str(path) in str(info.value)


def test_nyu_bts_skip_policy_counts(tmp_path, caplog):
    manual = tmp_path / "manual"
    fixtures.write_nyu_bts(str(manual))
    _nyu_break(manual, "missing")
    with caplog.at_level(logging.WARNING):
        builder = build(NyuDepthV2Bts, tmp_path, manual, on_bad_input="skip")
    assert builder.info.splits["train"].num_examples == len(fixtures.NYU_TRAIN) - 1
    assert any("skipped 1 bad example(s)" in r.getMessage() and "sync_depth_00046.png" in r.getMessage()
               for r in caplog.records)


def test_nyu_split_list_accepts_bts_three_column_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("kitchen_0028b/rgb_00045.jpg kitchen_0028b/sync_depth_00045.png 518.8579\n\n"
                    "/bathroom/rgb_00001.jpg /bathroom/sync_depth_00001.png\n")
    assert list(read_split_list(str(path))) == [
        (1, "kitchen_0028b/rgb_00045.jpg", "kitchen_0028b/sync_depth_00045.png"),
        (3, "bathroom/rgb_00001.jpg", "bathroom/sync_depth_00001.png")]
    path.write_text("only_one_column.jpg\n")
    with pytest.raises(BadInputError, match=r"list.txt:1"):
        list(read_split_list(str(path)))


def test_scene_class_rule_is_first_substring_in_reference_order():
    assert nyu_scene_class_id("kitchen_0028b_rgb_00045.jpg") == 6
    assert nyu_scene_class_id("study_room_0005b_rgb_00012.jpg") == 3  # study precedes study_room
    assert nyu_scene_class_id("office_kitchen_0001a_rgb_00007.jpg") == 6  # kitchen precedes office_kitchen
    assert nyu_scene_class_id("home_office_0004_rgb_00001.jpg") == 7
    assert nyu_scene_class_id("nyu_office_0_rgb_00001.jpg") == 25
    with pytest.raises(ValueError, match="garage_0001"):
        nyu_scene_class_id("garage_0001_rgb_00001.jpg")


def test_real_vpd_lists_and_class_order():
    import json

    shared = shared_vpd_data()
    with open(shared / "nyu_class_list.json") as f:
        assert tuple(json.load(f)) == NYU_SCENE_CLASSES
    counts = {}
    for name, expected in (("nyu_train_list.txt", 24231), ("nyu_test_list.txt", 654)):
        pairs = list(read_split_list(str(shared / name)))
        assert len(pairs) == expected
        for _, rgb, depth in pairs:
            scene, file = rgb.split("/")
            assert depth == f"{scene}/sync_depth_{file[4:-4]}.png"
            class_id = nyu_scene_class_id(f"{scene}_{file}")
            counts[class_id] = counts.get(class_id, 0) + 1
    # study_room and office_kitchen are never chosen (docs/reference.md, "Depth scene classes")
    assert 5 not in counts and 19 not in counts


# --------------------------------------------------------------------------------------------------
# phrasecut
# --------------------------------------------------------------------------------------------------
def test_phrasecut_one_example_per_image_with_each_phrases_union_mask(tmp_path, caplog):
    manual = tmp_path / "manual"
    fixtures.write_phrasecut(str(manual))
    with caplog.at_level(logging.INFO):
        builder = build(Phrasecut, tmp_path, manual)
    assert 150417 in REFERENCE_EXCLUDED_IMAGE_IDS
    assert any("excluded 1 task(s)" in r.getMessage() for r in caplog.records)
    assert any("phrasecut (test): 1 phrase(s) with an empty mask, kept" in r.getMessage() for r in caplog.records)
    for split, tasks in fixtures.PHRASECUT_TASKS.items():
        kept = {t["task_id"]: t for t in tasks if t["image_id"] not in REFERENCE_EXCLUDED_IMAGE_IDS}
        examples = read_all(builder, split)
        assert sorted(e["image_id"] for e in examples) == sorted({t["image_id"] for t in kept.values()})
        seen = []
        for e in examples:
            for phrase, task_id, mask in zip(e["phrases"]["phrase"], e["phrases"]["task_id"], e["phrases"]["mask"]):
                task = kept[task_id.decode()]
                assert phrase.decode() == task["phrase"] and e["image_id"] == task["image_id"]
                assert mask.dtype == np.uint8 and mask.shape == (*fixtures.PHRASECUT_IMAGES[task["image_id"]], 1)
                np.testing.assert_array_equal(mask[..., 0], fixtures.phrasecut_expected_mask(task).astype(np.uint8))
                seen.append(task["task_id"])
        assert sorted(seen) == sorted(kept)  # empty masks included


def test_polygon_mask_counts_edges_and_vertices_as_inside():
    """LD-ZNet's polygon2mask rule: the square with corners (1, 1) and (5, 5) covers 25 pixels (a half-open fill
    would cover 16), and the masks equal skimage's for integer and non-integer vertices."""
    from skimage.draw import polygon2mask

    square = [[1, 1], [5, 1], [5, 5], [1, 5]]
    assert polygon_mask(square, 8, 8).sum() == 25
    np.testing.assert_array_equal(np.nonzero(polygon_mask(square, 8, 8).any(0))[0], [1, 2, 3, 4, 5])
    rng = np.random.default_rng(0)
    for trial in range(600):
        h, w = rng.integers(1, 24, 2)
        points = rng.uniform(-3, 27, (rng.integers(1, 8), 2))
        if trial % 3 == 0:
            points = np.round(points)  # integer vertices: pixel centres on edges and corners
        elif trial % 3 == 1:
            points = np.round(points * 2) / 2
        reference = polygon2mask((h, w), points[:, ::-1])  # (y, x) points, as LD-ZNet's loader
        np.testing.assert_array_equal(polygon_mask(points.tolist(), h, w), reference, err_msg=str(points))
    assert not polygon_mask(fixtures.rectangle(20.5, 20.5, 30.5, 30.5), 10, 10).any()  # outside the image


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_phrasecut_bad_input_raises_naming_the_file(tmp_path, problem):
    manual = tmp_path / "manual"
    fixtures.write_phrasecut(str(manual))
    image = manual / "images" / "102.jpg"
    if problem == "missing":
        image.unlink()
    else:
        image.write_bytes(b"no jpeg here")
    message = {"missing": "file is missing", "unreadable": "unreadable image"}[problem]
    with pytest.raises(BadInputError, match=message) as info:
        build(Phrasecut, tmp_path, manual)
    assert str(image) in str(info.value)


def test_phrasecut_skip_policy_counts(tmp_path, caplog):
    manual = tmp_path / "manual"
    tasks = {k: list(v) for k, v in fixtures.PHRASECUT_TASKS.items()}
    tasks["validation"].append(fixtures.phrasecut_task(101, [88], "sign", [[(30.5, 2.5, 44.5, 12.5)]]))
    fixtures.write_phrasecut(str(manual), tasks=tasks)
    (manual / "images" / "102.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        builder = build(Phrasecut, tmp_path, manual, on_bad_input="skip")
    # Only image 101 remains, with its tasks.
    assert [builder.info.splits[s].num_examples for s in ("train", "validation", "test")] == [1, 1, 1]
    assert [len(e["phrases"]["task_id"]) for e in read_all(builder, "train")] == [2]
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("phrasecut (train): skipped 1 bad example(s)" in m and "102.jpg" in m for m in messages)


# --------------------------------------------------------------------------------------------------
# Local builders over real TFDS features
# --------------------------------------------------------------------------------------------------
def test_refcoco_fixture_has_real_ref_coco_specs(tmp_path):
    builder = fixtures.prepare(fixtures.RefCocoFixture(data_dir=str(tmp_path)))
    spec = builder.as_dataset(split="train").element_spec
    assert isinstance(spec["objects"]["refexp"]["raw"], tf.RaggedTensorSpec)
    first = read_all(builder, "validation")[0]
    mask = first["objects"]["mask"]
    assert mask.dtype == np.uint8 and mask.shape[-1] == 3 and set(np.unique(mask)) == {0, 255}
