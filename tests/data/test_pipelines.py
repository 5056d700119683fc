"""tf.data pipelines: determinism, iterator checkpoints, per-host shards, exact eval coverage, per-source plumbing."""
import collections
import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests.data import fixtures
from vpd_jax.data import config as data_config_lib
from vpd_jax.data import pipelines, transforms
from vpd_jax.data.builders import Ade20k, NyuDepthV2Bts, Phrasecut, VpdShapes
from vpd_jax.data.iterator import DataIterator

TASKS = ("seg", "depth", "refer", "phrasecut")


def fake_tokenize(texts, max_length):
    """Character codes, zero padded: reversible, so tests can read the text back from the tokens."""
    out = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
        codes = [ord(c) for c in text][:max_length]
        out[i, :len(codes)] = codes
    return out


def untokenize(tokens) -> str:
    return "".join(chr(c) for c in tokens if c)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    # Two shards of more than ReadConfig.interleave_block_length (16) examples in train, as real datasets
    # have: TFDS then interleaves the files when reading.
    fixtures.prepare(VpdShapes(config="small", data_dir=data_dir), num_shards=2)
    return data_dir


def shapes_data(task, shapes_dir, **overrides):
    overrides = {"batch_size_per_host": 4, "eval_batch_size_per_host": 5, "shuffle_buffer": 64,
                 "text_max_length": 40, **overrides}
    return data_config_lib.data_config(task, "vpd_shapes/small", data_dir=shapes_dir, **overrides)


def train_iterator(data, **kwargs):
    return pipelines.make_train_iterator(data, fake_tokenize, **{"process_index": 0, "process_count": 1, **kwargs})


def eval_batches(data, process_index, process_count, builder=None):
    it = pipelines.make_eval_iterator(data, fake_tokenize, builder=builder, process_index=process_index,
                                      process_count=process_count)
    return list(it)


@functools.lru_cache(maxsize=None)
def shapes_eval_batches(task, shapes_dir, process_index, process_count, split="validation"):
    return eval_batches(shapes_data(task, shapes_dir, eval_split=split), process_index, process_count)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------------------
# Determinism and checkpoints (vpd_shapes, real transforms)
# --------------------------------------------------------------------------------------------------
EXPECTED_TRAIN = {
    "seg": {"image": ((4, 64, 64, 3), np.float32), "label": ((4, 64, 64), np.int32)},
    "depth": {"image": ((4, 64, 64, 3), np.float32), "depth": ((4, 64, 64), np.float32), "scene_class": ((4,), np.int32)},
    "refer": {"image": ((4, 64, 64, 3), np.float32), "mask": ((4, 64, 64), np.int32), "tokens": ((4, 40), np.int32),
              "ref_id": ((4,), np.int64)},
    "phrasecut": {"image": ((4, 64, 64, 3), np.float32), "mask": ((4, 64, 64, 1), np.float32),
                  "tokens": ((4, 40), np.int32)},
}


@functools.lru_cache(maxsize=None)
def train_dataset(task, shapes_dir, seed=0, copy=0, order="shuffle_buffer"):
    """Built once per (task, seed, copy, order) for the module: pipeline construction is the slow part."""
    del copy  # distinct cache entries: two independent constructions from the same config
    data = shapes_data(task, shapes_dir, seed=seed, shuffle_buffer=16, sample_order=order)
    return pipelines.make_train_dataset(data, process_index=0, process_count=1)


# Every task with the shuffle buffer (vpd_shapes' default); the epoch permutation with a plain and a flattening source.
ORDERS = [(task, "shuffle_buffer") for task in TASKS] + [("depth", "permutation"), ("refer", "permutation")]


@pytest.mark.parametrize("task,order", ORDERS)
def test_same_seed_gives_identical_batches(task, order, shapes_dir):
    first = DataIterator(train_dataset(task, shapes_dir, order=order), fake_tokenize, 40)
    second = DataIterator(train_dataset(task, shapes_dir, copy=1, order=order), fake_tokenize, 40)
    batches = [next(first) for _ in range(3)]
    assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == EXPECTED_TRAIN[task]
    for batch in batches:
        assert_batches_equal(batch, next(second))
    other_seed = next(DataIterator(train_dataset(task, shapes_dir, seed=1, order=order), fake_tokenize, 40))
    assert not np.array_equal(other_seed["image"], batches[0]["image"])


@pytest.mark.parametrize("task,order", ORDERS)
def test_iterator_checkpoint_round_trip(task, order, shapes_dir, tmp_path):
    it = DataIterator(train_dataset(task, shapes_dir, order=order), fake_tokenize, 40)
    for _ in range(3):
        next(it)
    path = it.save(str(tmp_path / "process_0" / "ckpt"))
    expected = [next(it) for _ in range(3)]
    restored = DataIterator(train_dataset(task, shapes_dir, copy=1, order=order), fake_tokenize, 40)
    restored.restore(path)
    for batch in expected:
        assert_batches_equal(next(restored), batch)


def _refs_by_id(shapes_dir, split="train"):
    builder = tfds.builder("vpd_shapes/small", data_dir=shapes_dir)
    refs = {}
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
        for ref_id, sentences in zip(ex["objects"]["id"], ex["objects"]["refexp"]["raw"].to_list()):
            refs[int(ref_id)] = {s.decode() for s in sentences}
    return refs


def _image_of_ref(shapes_dir, split="train"):
    builder = tfds.builder("vpd_shapes/small", data_dir=shapes_dir)
    return {int(ref_id): int(ex["image/id"]) for ex in tfds.as_numpy(builder.as_dataset(split=split))
            for ref_id in ex["objects"]["id"]}


@pytest.mark.parametrize("order", ["shuffle_buffer", "permutation"])
def test_train_shards_are_disjoint_and_cover_the_split(order, shapes_dir):
    refs = _refs_by_id(shapes_dir)
    seen = []
    for index in range(2):
        it = train_iterator(shapes_data("refer", shapes_dir, batch_size_per_host=8, sample_order=order),
                            process_index=index, process_count=2)
        ids = set()
        for _ in range(2 * len(refs) // 8 + 2):  # at least one whole epoch of this host's half
            ids.update(int(r) for r in next(it)["ref_id"])
        seen.append(ids)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(refs)


def test_permutation_visits_every_element_once_per_epoch_in_a_new_order(shapes_dir):
    """The references' DistributedSampler order: each epoch is a permutation of all the host's refs."""
    size = len(_refs_by_id(shapes_dir))
    it = train_iterator(shapes_data("refer", shapes_dir, batch_size_per_host=size, sample_order="permutation"))
    epochs = [next(it)["ref_id"].tolist() for _ in range(3)]  # one batch = one epoch
    for epoch in epochs:
        assert sorted(epoch) == sorted(_refs_by_id(shapes_dir))
    assert epochs[0] != epochs[1] != epochs[2]


def _same_image_neighbours(ref_ids, image_of):
    """The fraction of consecutive elements of the stream that are refs of one image."""
    images = [image_of[r] for r in ref_ids]
    return np.mean([a == b for a, b in zip(images[:-1], images[1:])])


def test_refs_of_one_image_are_neighbours_with_the_buffer_but_not_with_the_permutation(shapes_dir):
    """A shuffle buffer much smaller than the split (1,000 elements against RefCOCO's 42k refs) keeps the refs of
    one image close, so batches often hold several; the permutation makes that as rare as chance."""
    image_of = _image_of_ref(shapes_dir)
    per_image = collections.Counter(image_of.values())
    n = len(image_of)
    by_chance = sum(c * (c - 1) for c in per_image.values()) / (n * (n - 1))  # a uniformly random order
    rates = {}
    for order in ("shuffle_buffer", "permutation"):
        it = train_iterator(shapes_data("refer", shapes_dir, batch_size_per_host=n, sample_order=order,
                                        shuffle_buffer=4))
        rates[order] = np.mean([_same_image_neighbours(next(it)["ref_id"].tolist(), image_of) for _ in range(4)])
    assert rates["shuffle_buffer"] > 4 * by_chance
    assert rates["permutation"] < 2 * by_chance


def test_refer_training_draws_one_of_the_refs_sentences_each_epoch(shapes_dir):
    refs = _refs_by_id(shapes_dir)
    it = train_iterator(shapes_data("refer", shapes_dir, batch_size_per_host=8))
    drawn = collections.defaultdict(set)
    for _ in range(6 * len(refs) // 8):  # about six epochs
        batch = next(it)
        for ref_id, tokens in zip(batch["ref_id"], batch["tokens"]):
            drawn[int(ref_id)].add(untokenize(tokens))
    for ref_id, texts in drawn.items():
        assert texts <= refs[ref_id]
    assert any(len(texts) > 1 for texts in drawn.values())  # re-drawn per epoch, not fixed per ref


# --------------------------------------------------------------------------------------------------
# Evaluation: every example exactly once per host layout, same number of batches on every host
# --------------------------------------------------------------------------------------------------
def _expected_eval_keys(task, shapes_dir, split):
    builder = tfds.builder("vpd_shapes/small", data_dir=shapes_dir)
    keys = []
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
        name = ex["file_name"].decode()
        if task in ("seg", "depth"):
            keys.append(name)
        elif task == "refer":
            for ref_id, ids in zip(ex["objects"]["id"], ex["objects"]["refexp"]["refexp_id"].to_list()):
                keys += [(int(ref_id), int(i)) for i in ids]
        else:
            keys += [f"{name}:{i}" for i in range(len(ex["phrases"]["raw"]))]
    return keys


def _eval_keys(task, batch):
    valid = batch["valid"]
    if task == "refer":
        return [(int(r), int(s)) for r, s in zip(batch["ref_id"][valid], batch["sentence_id"][valid])]
    return [i.decode() for i in batch["id"][valid]]


@pytest.mark.parametrize("task,process_count,split", [("seg", 3, "validation"), ("depth", 2, "validation"),
                                                      ("refer", 3, "train"), ("phrasecut", 2, "validation")])
def test_eval_covers_every_example_exactly_once(task, process_count, split, shapes_dir):
    batch_size = shapes_data(task, shapes_dir).eval_batch_size_per_host
    per_host = [shapes_eval_batches(task, shapes_dir, i, process_count, split) for i in range(process_count)]
    assert len({len(batches) for batches in per_host}) == 1  # all hosts run the same number of batches
    seen = collections.Counter()
    for batches in per_host:
        for batch in batches:
            assert len(batch["valid"]) == batch_size
            seen.update(_eval_keys(task, batch))
            if task == "seg":
                assert (batch["label"][~batch["valid"]] == 255).all()  # padding examples are all ignore
            else:
                assert (batch["image"][~batch["valid"]] == 0).all()
    expected = _expected_eval_keys(task, shapes_dir, split)
    assert len(set(expected)) == len(expected)
    assert seen == collections.Counter(expected)
    assert any(batches[-1]["valid"].any() for batches in per_host)  # no batch is padding on every host


def test_phrasecut_eval_prompts_do_not_depend_on_the_host_layout(shapes_dir):
    texts = collections.defaultdict(set)
    for count in (1, 2):
        for index in range(count):
            for batch in shapes_eval_batches("phrasecut", shapes_dir, index, count):
                for key, tokens in zip(_eval_keys("phrasecut", batch), batch["tokens"][batch["valid"]]):
                    texts[key].add(untokenize(tokens))
    assert all(len(t) == 1 for t in texts.values())
    templates = transforms.PhraseCutConfig().templates
    used = {next(i for i, t in enumerate(templates) if text == t.format(key.split(":")[0]) or
                 text.startswith(t.split("{}")[0])) for key, (text,) in texts.items()}
    assert len(used) > 1  # templates are drawn, not fixed


# --------------------------------------------------------------------------------------------------
# Real source layouts through the pipelines
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ade_builder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    labels = fixtures.write_ade20k(str(root / "manual"))
    return fixtures.prepare(Ade20k(data_dir=str(root / "tfds")), str(root / "manual")), labels


def test_seg_eval_pads_to_buckets_and_keeps_original_labels(ade_builder):
    builder, labels = ade_builder
    data = data_config_lib.data_config("seg", "ade20k", eval_batch_size_per_host=1, seg_eval_pad_multiple=32,
                                       aug={"img_scale": (256, 64)})
    batches = eval_batches(data, 0, 1, builder=builder)
    assert len(batches) == len(labels["validation"])
    for batch in batches:
        (h, w), (lh, lw) = batch["image_hw"][0], batch["label_hw"][0]
        raw = labels["validation"][batch["id"][0].decode()[:-4]]
        assert (lh, lw) == raw.shape and min(h, w) == 64  # keep-ratio resize, short side 64
        image, label = batch["image"][0], batch["label"][0]
        assert image.shape[0] % 32 == 0 and image.shape[1] % 32 == 0 and image.shape[:2] == (-(-h // 32) * 32,
                                                                                          -(-w // 32) * 32)
        assert label.shape == (-(-lh // 32) * 32, -(-lw // 32) * 32)
        assert (image[h:] == 0).all() and (image[:, w:] == 0).all()
        np.testing.assert_array_equal(label[:lh, :lw], transforms.reduce_zero_label(raw).numpy())
        assert (label[lh:] == 255).all() and (label[:, lw:] == 255).all()


def test_seg_eval_batches_pad_to_the_largest_member(ade_builder):
    builder, labels = ade_builder
    data = data_config_lib.data_config("seg", "ade20k", eval_batch_size_per_host=4, seg_eval_pad_multiple=32,
                                       aug={"img_scale": (256, 64)})
    (batch,) = eval_batches(data, 0, 1, builder=builder)
    assert batch["valid"].tolist() == [True, True, False, False]
    assert batch["image"].shape[1:3] == tuple(-(-batch["image_hw"][:2].max(axis=0) // 32) * 32)
    assert batch["label"].shape[1:3] == tuple(-(-batch["label_hw"][:2].max(axis=0) // 32) * 32)
    for i in range(2):  # beyond each member's own size: image 0, label 255 (ignore)
        (h, w), (lh, lw) = batch["image_hw"][i], batch["label_hw"][i]
        assert (batch["image"][i, h:] == 0).all() and (batch["image"][i, :, w:] == 0).all()
        assert (batch["label"][i, lh:] == 255).all() and (batch["label"][i, :, lw:] == 255).all()
        assert (batch["label"][i, :lh, :lw] != 255).any()


def test_seg_train_on_ade20k(ade_builder):
    builder, _ = ade_builder
    data = data_config_lib.data_config("seg", "ade20k", batch_size_per_host=2,
                                       aug={"img_scale": (256, 64), "crop_size": (32, 32)})
    batch = next(pipelines.make_train_iterator(data, builder=builder, process_index=0, process_count=1))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["label"].shape == (2, 32, 32)
    assert set(np.unique(batch["label"])) <= set(range(150)) | {255}
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1


@pytest.fixture(scope="module")
def nyu_builder(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyu")
    written = fixtures.write_nyu_bts(str(root / "manual"))
    return fixtures.prepare(NyuDepthV2Bts(data_dir=str(root / "tfds")), str(root / "manual")), written


def test_nyu_bts_depth_in_metres_with_scene_class(nyu_builder):
    builder, written = nyu_builder
    data = data_config_lib.data_config("depth", "nyu_depth_v2_bts", eval_batch_size_per_host=2, batch_size_per_host=2)
    seen = set()
    for batch in eval_batches(data, 0, 1, builder=builder):
        assert batch["image"].shape == (2, 480, 640, 3)
        for name, depth, scene_class in zip(batch["id"], batch["depth"], batch["scene_class"]):
            scene, file = name.decode().split("_rgb_")
            mm = written["test"][f"{scene}/rgb_{file}"]
            np.testing.assert_array_equal(depth, mm.astype(np.float32) / 1000)
            assert scene_class == {"bathroom": 1, "living_room": 2}[scene]
            seen.add(scene)
    assert seen == {"bathroom", "living_room"}
    train = next(pipelines.make_train_iterator(data, builder=builder, process_index=0, process_count=1))
    assert train["image"].shape == (2, 480, 480, 3) and train["depth"].shape == (2, 480, 480)
    all_mm = np.concatenate([d.ravel() for d in written["train"].values()])
    assert np.isin(train["depth"], np.unique(all_mm).astype(np.float32) / 1000).all()  # metres, not resampled
    assert set(train["scene_class"]) <= {3, 6}


def test_tfds_nyu_depth_v2_needs_a_scene_class_fallback(tmp_path):
    builder = fixtures.prepare(fixtures.NyuDepthV2Fixture(data_dir=str(tmp_path)))
    data = data_config_lib.data_config("depth", "nyu_depth_v2", eval_batch_size_per_host=2)
    with pytest.raises(ValueError, match="scene_class_fallback"):
        pipelines.make_eval_dataset(data, builder=builder, process_index=0, process_count=1)
    data.scene_class_fallback = 8
    batches = eval_batches(data, 0, 1, builder=builder)
    depths = [d for b in batches for d, v in zip(b["depth"], b["valid"]) if v]
    for depth, expected in zip(depths, fixtures.nyu_fixture_depths("validation")):
        np.testing.assert_array_equal(depth, expected.astype(np.float32))
    assert all((b["scene_class"] == 8).all() for b in batches)


@pytest.fixture(scope="module")
def refcoco_builder(tmp_path_factory):
    return fixtures.prepare(fixtures.RefCocoFixture(data_dir=str(tmp_path_factory.mktemp("refcoco"))))


def _refcoco_eval_texts(builder, name="ref_coco/refcoco_unc", **overrides) -> dict[int, str]:
    data = data_config_lib.data_config("refer", name, eval_batch_size_per_host=4, aug={"size": 32},
                                       text_max_length=64, **overrides)  # whole sentences: no truncation
    return {int(i): untokenize(t) for batch in eval_batches(data, 0, 1, builder=builder)
            for i, t in zip(batch["sentence_id"][batch["valid"]], batch["tokens"][batch["valid"]])}


def test_refcoco_eval_is_one_element_per_sentence_with_its_refs_mask(refcoco_builder):
    data = data_config_lib.data_config("refer", "ref_coco/refcoco_unc", eval_batch_size_per_host=4,
                                       aug={"size": 32})
    cfg = data_config_lib.transform_config(data)
    expected = {}
    for image_id, (size, refs) in fixtures.REFCOCO_IMAGES["validation"].items():
        for ann_id, rect, sentences in refs:
            for sentence_id, sentence in sentences:
                expected[(ann_id, sentence_id)] = (image_id, fixtures.rect_mask(size, rect))
    seen = set()
    for batch in eval_batches(data, 0, 1, builder=refcoco_builder):
        for i in np.nonzero(batch["valid"])[0]:
            key = (int(batch["ref_id"][i]), int(batch["sentence_id"][i]))
            image_id, mask = expected[key]
            assert key not in seen and batch["image_id"][i] == image_id
            reference = transforms.refer(np.zeros((*mask.shape, 3), np.uint8), mask.astype(np.int32), cfg)["mask"]
            np.testing.assert_array_equal(batch["mask"][i], reference.numpy())
            seen.add(key)
    assert seen == set(expected)


def _fixture_sentences(split):
    return {i: raw for _, refs in fixtures.REFCOCO_IMAGES[split].values() for _, _, sentences in refs
            for i, raw in sentences}


def test_refcoco_sentences_are_refers_normalised_text_by_default(refcoco_builder):
    """Without REFER's own file: lower-cased, punctuation removed (REFER's `sent` wherever REFER only normalised;
    its corrections, "w" -> "with" in sentence 9102, need the file: next test)."""
    raw = _fixture_sentences("validation")
    expected = {i: fixtures.refer_sent(s) for i, s in raw.items()}
    expected[9102] = "lady w back to us"
    assert _refcoco_eval_texts(refcoco_builder) == expected
    assert _refcoco_eval_texts(refcoco_builder, refer_text="raw") == raw  # TFDS' text, punctuation and case kept


def test_refcoco_sentences_from_refers_file_are_exact(refcoco_builder, tmp_path):
    path = fixtures.write_refcoco_json(str(tmp_path / "refcoco.json"))
    texts = _refcoco_eval_texts(refcoco_builder, refer_sentences=path)
    assert texts == {i: fixtures.refer_sent(s) for i, s in _fixture_sentences("validation").items()}
    assert texts[9102] == "lady with back to us"
    with pytest.raises(ValueError, match=r"refcoco.json: no refs of dataset 'refcocog' split by 'umd'"):
        _refcoco_eval_texts(refcoco_builder, refer_sentences=path, name="ref_coco/refcocog_umd")


def test_refcoco_train_is_one_element_per_ref(refcoco_builder):
    data = data_config_lib.data_config("refer", "ref_coco/refcoco_unc", batch_size_per_host=5, aug={"size": 32})
    assert data.sample_order == "permutation"  # the default of every real dataset
    it = pipelines.make_train_iterator(data, fake_tokenize, builder=refcoco_builder, process_index=0, process_count=1)
    sentences = {ann: {fixtures.refer_sent(s) for _, s in sent}
                 for _, refs in fixtures.REFCOCO_IMAGES["train"].values() for ann, _, sent in refs}
    assert len(sentences) == 5
    for _ in range(2):  # exactly two epochs: each a permutation of the refs
        batch = next(it)
        assert set(np.unique(batch["mask"])) <= {0, 1}
        for ref_id, tokens in zip(batch["ref_id"], batch["tokens"]):
            assert untokenize(tokens) in sentences[int(ref_id)]
        assert sorted(batch["ref_id"].tolist()) == sorted(sentences)


def test_permutation_resumes_exactly_across_epochs(refcoco_builder, tmp_path):
    data = data_config_lib.data_config("refer", "ref_coco/refcoco_unc", batch_size_per_host=3, aug={"size": 16})

    def iterator():
        return pipelines.make_train_iterator(data, fake_tokenize, builder=refcoco_builder, process_index=0,
                                             process_count=1)

    it = iterator()
    next(it)
    path = it.save(str(tmp_path / "ckpt"))
    expected = [next(it) for _ in range(4)]  # 12 more elements: into the third epoch of 5 refs
    restored = iterator()
    restored.restore(path)
    for batch in expected:
        assert_batches_equal(next(restored), batch)


@pytest.fixture(scope="module")
def phrasecut_builder(tmp_path_factory):
    root = tmp_path_factory.mktemp("phrasecut")
    fixtures.write_phrasecut(str(root / "manual"))
    return fixtures.prepare(Phrasecut(data_dir=str(root / "tfds")), str(root / "manual"))


def test_phrasecut_eval_squashes_the_union_mask_and_prompts_the_phrase(phrasecut_builder):
    data = data_config_lib.data_config("phrasecut", "phrasecut", eval_batch_size_per_host=2, aug={"size": 24})
    cfg = data_config_lib.transform_config(data)
    tasks = {t["task_id"]: t for t in fixtures.PHRASECUT_TASKS["test"]}
    seen, empty = set(), set()
    for batch in eval_batches(data, 0, 1, builder=phrasecut_builder):
        for i in np.nonzero(batch["valid"])[0]:
            task = tasks[batch["id"][i].decode()]
            source = fixtures.phrasecut_expected_mask(task).astype(np.int32)
            reference = transforms.phrasecut_eval(np.zeros((*source.shape, 3), np.uint8), source, cfg)["mask"]
            np.testing.assert_array_equal(batch["mask"][i], reference.numpy())
            assert untokenize(batch["tokens"][i]) in {t.format(task["phrase"]) for t in cfg.templates}
            seen.add(task["task_id"])
            if not batch["mask"][i].any():
                empty.add(task["task_id"])
    assert seen == set(tasks)
    assert empty == {"101__11"}  # the phrase whose polygon lies outside its image is evaluated, as the reference
    train = next(pipelines.make_train_iterator(data, fake_tokenize, builder=phrasecut_builder, process_index=0,
                                               process_count=1))
    batch = data.batch_size_per_host
    assert train["image"].shape == (batch, 24, 24, 3) and train["mask"].shape == (batch, 24, 24, 1)
    assert set(np.unique(train["mask"])) <= {0.0, 1.0}


# --------------------------------------------------------------------------------------------------
# Config, iterator and environment
# --------------------------------------------------------------------------------------------------
def test_aug_fields_map_onto_the_transform_config():
    data = data_config_lib.data_config("seg", "ade20k", aug={"crop_size": (256, 256), "photometric": {}})
    cfg = data_config_lib.transform_config(data)
    assert isinstance(cfg, transforms.SegAugConfig) and cfg.crop_size == (256, 256)
    assert cfg.photometric == transforms.SegAugConfig().photometric
    data.aug.crop_size = (128, 128)  # a command-line style override
    assert data_config_lib.transform_config(data).crop_size == (128, 128)
    with pytest.raises((KeyError, AttributeError)):
        data_config_lib.data_config("seg", "ade20k", aug={"crop_sise": (1, 1)})


def test_unknown_transform_field_is_named():
    data = data_config_lib.data_config("refer", "ref_coco/refcocog_umd")
    data.aug.unlock()
    data.aug.colour = True
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\] for ReferConfig"):
        data_config_lib.transform_config(data)


def test_unsupported_task_and_dataset_pair_is_a_clear_error(shapes_dir):
    data = data_config_lib.data_config("depth", "ade20k")
    with pytest.raises(ValueError, match=r"no 'depth' pipeline for dataset 'ade20k'.*seg:ade20k"):
        pipelines.make_train_dataset(data, builder=tfds.builder("vpd_shapes/small", data_dir=shapes_dir),
                                     process_index=0, process_count=1)


def test_iterator_without_tokenizer_keeps_text_and_checks_tokenizer_output():
    ds = tf.data.Dataset.from_tensors({"text": tf.constant(["a cat", "dogs"]), "x": tf.constant([1, 2])}).repeat()
    assert next(DataIterator(ds))["text"].tolist() == [b"a cat", b"dogs"]
    batch = next(DataIterator(ds, fake_tokenize, max_length=3, keep_text=True))
    assert untokenize(batch["tokens"][0]) == "a c" and "text" in batch
    with pytest.raises(ValueError, match=r"expected int \(2, 3\)"):
        next(DataIterator(ds, lambda texts, n: np.zeros((2, n + 1), np.int32), max_length=3))


def test_real_clip_tokenizer_plugs_in(tmp_path, shapes_dir):
    from tests.reference_models import write_tiny_tokenizer
    from vpd_jax.models.tokenizer import load_tokenizer

    write_tiny_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    data = shapes_data("refer", shapes_dir, text_max_length=8)
    it = pipelines.make_eval_iterator(data, tok, process_index=0, process_count=1)
    batch = next(DataIterator(it.dataset, tok, 8, keep_text=True))
    np.testing.assert_array_equal(batch["tokens"], tok([t.decode() for t in batch["text"]], 8))


def test_tensorflow_sees_no_accelerator():
    assert tf.config.get_visible_devices("GPU") == [] and tf.config.get_visible_devices("TPU") == []


def test_paper_configs_visit_each_sample_once_per_epoch():
    """The reproduction configs use the references' order (an epoch permutation); vpd_shapes runs keep theirs."""
    import importlib

    for name, args in (("vpd_seg_ade20k", ("",)), ("vpd_depth_nyu", ("",)), ("vpd_refer", ("refcoco", "refcocog")),
                       ("ldznet_phrasecut", ("",)), ("probe_sd_features", ("",))):
        module = importlib.import_module(f"configs.{name}")
        for arg in args:
            assert module.get_config(arg).data.sample_order == "permutation", (name, arg)
        assert module.get_config("smoke").data.sample_order == "shuffle_buffer", name
