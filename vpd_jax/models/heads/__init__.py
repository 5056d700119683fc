"""Task heads on the VPD feature pyramid (finest first, NHWC): Semantic FPN, depth, referring."""
from vpd_jax.models.heads.depth import DepthDecoder, DepthFusion, DepthHead
from vpd_jax.models.heads.fpn import FPN, FPNHead, SemanticFPN
from vpd_jax.models.heads.refer import SimpleDecoding

__all__ = ["DepthDecoder", "DepthFusion", "DepthHead", "FPN", "FPNHead", "SemanticFPN", "SimpleDecoding"]
