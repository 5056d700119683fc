"""TFDS builders of vpd_jax. Importing this package registers them with TFDS (`tfds.builder('ade20k')`).

  ade20k             ADEChallengeData2016, raw labels 0..150              (manual: zip or folder)
  nyu_depth_v2_bts   NYUv2 BTS sync train + official test, depth in mm    (manual: folder + split lists)
  phrasecut          VGPhraseCut, one example per image, its phrases with union masks (manual: VGPhraseCut_v0)
  vpd_shapes         rendered scenes for all tasks                        (no download)
RefCOCO/+/g come from TFDS' own `ref_coco`.
"""
from vpd_jax.data.builders.ade20k import Ade20k
from vpd_jax.data.builders.common import BadInputError
from vpd_jax.data.builders.nyu_depth_v2_bts import NyuDepthV2Bts
from vpd_jax.data.builders.phrasecut import Phrasecut
from vpd_jax.data.builders.vpd_shapes import VpdShapes

__all__ = ["Ade20k", "BadInputError", "NyuDepthV2Bts", "Phrasecut", "VpdShapes"]
