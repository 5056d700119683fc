"""Tiny PyTorch models of VPD's released task models, with the originals' module names and forward order
(wl-zhao/VPD: `VPDSeg` in segmentation/models/vpd_seg.py, `VPDDepth` in depth/models_depth/model.py, `VPDRefer` in
refer/models_refer/model.py, `UNetWrapper` / `AttentionStore` / `TextAdapter*` in vpd/models.py), written from the
facts of that code, and their released containers.

The SD UNet and VAE are diffusers modules (`unet.unet.diffusion_model`, `encoder_vq`); `save_*` writes their keys
in the ldm names the released files have (the tests' independent diffusers -> ldm mapping). The architecture is
the `tiny` preset (channels 16-64), so the importer's config needs no SD files. Generalisations of the original,
which only runs 512-pixel inputs: the attention store's size limit and level sizes follow `base_size` (the input
side), and the taps are the second layer of each up block (ldm output blocks 1, 4, 7 for SD's three layers per
level) plus the last block's output.
"""
from __future__ import annotations

import argparse
import collections
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.models.heads.test_depth import TorchDecoder
from tests.models.heads.test_fpn import TorchFPN, TorchFPNHead
from tests.models.heads.test_refer import TorchSimpleDecoding
from tests.reference_models import unet_diffusers_to_ldm, vae_diffusers_to_ldm
from vpd_jax.models.presets import ARCHITECTURES

TINY = ARCHITECTURES["tiny"]
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")


# ------------------------------------------------------------------------------------------ SD parts (diffusers)


def diffusers_unet_config(arch=TINY) -> dict:
    u = arch.unet
    return dict(sample_size=8, in_channels=u.in_channels, out_channels=u.out_channels,
                down_block_types=u.down_block_types, up_block_types=u.up_block_types,
                block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block[0],
                attention_head_dim=u.num_attention_heads[0], cross_attention_dim=u.cross_attention_dim,
                norm_num_groups=u.norm_num_groups)


def diffusers_vae_config(arch=TINY) -> dict:
    v = arch.vae
    levels = len(v.block_out_channels)
    return dict(block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                norm_num_groups=v.norm_num_groups, latent_channels=v.latent_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)


def randomize_(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Every parameter and BatchNorm statistic perturbed (PyTorch starts norms at 1 / 0 and some convs at 0,
    which would hide a swapped or dropped tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module.eval()


class AttentionStore:
    """vpd/models.py AttentionStore: head-averaged probabilities per '{down,mid,up}_{cross,self}', kept when the
    query count is <= max_size^2 (max_size = base_size / 8 / 2)."""

    def __init__(self, base_size: int):
        self.max_size = base_size // 8 // 2
        self.reset()

    def reset(self):
        self.step_store = {f"{place}_{kind}": [] for place in ("down", "mid", "up") for kind in ("cross", "self")}

    def __call__(self, attn, is_cross: bool, place: str):
        if attn.shape[1] <= self.max_size ** 2:
            self.step_store[f"{place}_{'cross' if is_cross else 'self'}"].append(attn)


class StoringAttnProcessor:
    """ldm CrossAttention's forward as VPD patches it: softmax(q k^T * scale), mean over heads to the store."""

    def __init__(self, store: AttentionStore, place: str):
        self.store, self.place = store, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context),
                                                       attn.to_v(context)))
        probs = (torch.einsum("bid,bjd->bij", q, k) * attn.scale).softmax(dim=-1)
        batch = hidden_states.shape[0]
        self.store(probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(1), is_cross, self.place)
        out = attn.batch_to_head_dim(torch.einsum("bij,bjd->bid", probs, v))
        return attn.to_out[1](attn.to_out[0](out))


class DiffusionWrapper(nn.Module):
    """ldm's DiffusionWrapper: the UNet under `diffusion_model`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


class UNetWrapper(nn.Module):
    """vpd/models.py UNetWrapper: the UNet's decoder states [ob1, ob4, ob7, ob11] (hooks on the diffusers modules
    that produce them), attention maps averaged per size and concatenated after ob4 (size16) and ob7 (size32),
    returned finest first."""

    def __init__(self, unet: nn.Module, use_attn: bool = True, base_size: int = 512,
                 attn_selector: str = "up_cross+down_cross"):
        super().__init__()
        self.unet = DiffusionWrapper(unet)
        self.attention_store = AttentionStore(base_size)
        self.size16, self.size32, self.size64 = base_size // 32, base_size // 16, base_size // 8
        self.use_attn = use_attn
        self.attn_selector = attn_selector.split("+")
        if use_attn:
            unet.set_attn_processor({name: StoringAttnProcessor(self.attention_store, _place(name))
                                     for name in unet.attn_processors})
        kinds = unet.config.up_block_types
        self.taps = [f"up_blocks.{i}.{'attentions' if kind == 'CrossAttnUpBlock2D' else 'resnets'}.1"
                     for i, kind in enumerate(kinds[:-1])] + [f"up_blocks.{len(kinds) - 1}"]

    def forward(self, latents, t, c_crossattn):
        if self.use_attn:
            self.attention_store.reset()
        modules = dict(self.unet.diffusion_model.named_modules())
        outs, handles = {}, []
        for name in self.taps:
            def hook(_module, _inputs, output, name=name):
                outs[name] = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                if name == self.taps[-1]:
                    raise _LastTap  # the original's forward ends here: the noise head (`out`) never runs
            handles.append(modules[name].register_forward_hook(hook))
        try:
            self.unet.diffusion_model(latents, t, torch.cat(c_crossattn, 1))
        except _LastTap:
            pass
        finally:
            for h in handles:
                h.remove()
        out_list = [outs[name] for name in self.taps]
        if self.use_attn:
            attn16, attn32 = self.process_attn(self.attention_store.step_store)
            out_list[1] = torch.cat([out_list[1], attn16], dim=1)
            out_list[2] = torch.cat([out_list[2], attn32], dim=1)
        return out_list[::-1]

    def process_attn(self, store):
        attns = {self.size16: [], self.size32: [], self.size64: []}
        for key in self.attn_selector:
            for attn in store[key]:
                size = int(math.sqrt(attn.shape[1]))
                attns[size].append(attn.reshape(attn.shape[0], size, size, -1).permute(0, 3, 1, 2))
        return torch.stack(attns[self.size16]).mean(0), torch.stack(attns[self.size32]).mean(0)


class _LastTap(Exception):
    pass


def _place(processor_name: str) -> str:
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[processor_name.split(".")[0]]


class TextAdapter(nn.Module):
    """vpd/models.py TextAdapter{,Refer,Depth}: texts + gamma * fc(texts) (fc = Linear, GELU, Linear)."""

    def __init__(self, text_dim: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))

    def forward(self, latents, texts, gamma):
        return texts + gamma * self.fc(texts)


def _sd_parts(seed: int, arch=TINY):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel(**diffusers_unet_config(arch)), seed)
    vae = randomize_(AutoencoderKL(**diffusers_vae_config(arch)), seed + 1)
    del vae.decoder  # the originals delete it; post_quant_conv stays
    return unet, vae


def _encode(encoder_vq, img):
    with torch.no_grad():
        return encoder_vq.encode(img).latent_dist.mode().detach()


class ScheduleBuffers(nn.Module):
    """What is left of VPDSeg's `sd_model` (a LatentDiffusion with model, first and cond stage removed): the
    noise-schedule buffers of ldm's register_schedule (SD's 'linear' schedule, float64 maths, float32 buffers)."""

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
        super().__init__()
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
        alphas = 1.0 - betas
        cumprod = np.cumprod(alphas)
        prev = np.append(1.0, cumprod[:-1])
        variance = betas * (1.0 - prev) / (1.0 - cumprod)
        with np.errstate(divide="ignore"):  # variance[0] = 0; ldm overwrites that entry too
            lvlb = betas ** 2 / (2 * variance * alphas * (1 - cumprod))
        lvlb[0] = lvlb[1]
        values = dict(
            betas=betas, alphas_cumprod=cumprod, alphas_cumprod_prev=prev, sqrt_alphas_cumprod=np.sqrt(cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - cumprod), log_one_minus_alphas_cumprod=np.log(1.0 - cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / cumprod), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / cumprod - 1),
            posterior_variance=variance, posterior_log_variance_clipped=np.log(np.maximum(variance, 1e-20)),
            posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - cumprod),
            posterior_mean_coef2=(1.0 - prev) * np.sqrt(alphas) / (1.0 - cumprod), lvlb_weights=lvlb)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ the models


class VPDSeg(nn.Module):
    """segmentation/models/vpd_seg.py VPDSeg (Semantic FPN neck and head, align_corners False)."""

    def __init__(self, num_classes: int, class_embeddings: torch.Tensor, fpn_channels: int = 16,
                 base_size: int = 64, seed: int = 0, arch=TINY):
        super().__init__()
        unet, self.encoder_vq = _sd_parts(seed, arch)
        self.unet = UNetWrapper(unet, base_size=base_size)
        self.sd_model = ScheduleBuffers()
        self.register_buffer("class_embeddings", class_embeddings)
        dim = class_embeddings.shape[-1]
        self.gamma = nn.Parameter(torch.ones(dim) * 1e-4)
        self.text_adapter = TextAdapter(dim)
        c = arch.unet.block_out_channels
        self.neck = TorchFPN([c[0], c[1] + num_classes, c[2] + num_classes, c[3]], fpn_channels)
        self.decode_head = TorchFPNHead(fpn_channels, num_classes, [4, 8, 16, 32], 0.1)
        randomize_(self, seed + 2)

    def extract_feat(self, img):
        latents = _encode(self.encoder_vq, img)
        c_crossattn = self.text_adapter(latents, self.class_embeddings, self.gamma)
        c_crossattn = c_crossattn[None].expand(img.shape[0], *c_crossattn.shape)
        t = torch.ones((img.shape[0],), dtype=torch.long)
        return self.unet(latents, t, c_crossattn=[c_crossattn])

    def forward(self, img):
        """(logits at the image size, the four features)"""
        feats = self.extract_feat(img)
        out = self.decode_head(self.neck(feats))
        return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False), feats


class VPDDepthEncoder(nn.Module):
    """depth/models_depth/model.py VPDDepthEncoder: fusion of [o0, o1, cat(o2, nearest x2 o3)]."""

    def __init__(self, out_dim: int, class_embeddings: torch.Tensor, seed: int, arch=TINY):
        super().__init__()
        c = arch.unet.block_out_channels
        prior = [c[0], c[1], c[2] + c[3]]
        self.layer1 = nn.Sequential(nn.Conv2d(prior[0], prior[0], 3, stride=2, padding=1), nn.GroupNorm(16, prior[0]),
                                    nn.ReLU(), nn.Conv2d(prior[0], prior[0], 3, stride=2, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(prior[1], prior[1], 3, stride=2, padding=1))
        self.out_layer = nn.Sequential(nn.Conv2d(sum(prior), out_dim, 1), nn.GroupNorm(16, out_dim), nn.ReLU())
        unet, self.encoder_vq = _sd_parts(seed, arch)
        self.unet = UNetWrapper(unet, use_attn=False)
        del self.unet.unet.diffusion_model.conv_norm_out, self.unet.unet.diffusion_model.conv_out  # `del ...out`
        self.text_adapter = TextAdapter(class_embeddings.shape[-1])
        self.register_buffer("class_embeddings", class_embeddings)
        self.gamma = nn.Parameter(torch.ones(class_embeddings.shape[-1]) * 1e-4)

    def forward(self, x, class_ids):
        latents = _encode(self.encoder_vq, x)
        c_crossattn = self.text_adapter(latents, self.class_embeddings[class_ids.tolist()], self.gamma)[:, None]
        t = torch.ones((x.shape[0],), dtype=torch.long)
        outs = self.unet(latents, t, c_crossattn=[c_crossattn])
        self.features = outs  # kept for the tests' feature comparison
        feats = [outs[0], outs[1], torch.cat([outs[2], F.interpolate(outs[3], scale_factor=2)], dim=1)]
        return self.out_layer(torch.cat([self.layer1(feats[0]), self.layer2(feats[1]), feats[2]], dim=1))


class VPDDepth(nn.Module):
    """depth/models_depth/model.py VPDDepth. The original pads 480 -> 512 and crops the fusion map by one; here
    any side that is a multiple of 32 but not of 64 is padded by 32 and cropped by one, the same rule."""

    def __init__(self, class_embeddings: torch.Tensor, fusion_channels: int = 32, num_filters=(8, 8, 8),
                 decoder_channels: int = 16, max_depth: float = 10.0, seed: int = 0, arch=TINY):
        super().__init__()
        self.max_depth = max_depth
        self.encoder = VPDDepthEncoder(fusion_channels, class_embeddings, seed, arch)
        self.decoder = TorchDecoder(fusion_channels, num_filters, decoder_channels)
        self.last_layer_depth = nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1),
                                              nn.ReLU(inplace=False), nn.Conv2d(decoder_channels, 1, 3, padding=1))
        randomize_(self, seed + 2)

    def forward(self, x, class_ids):
        """x in [0, 1] (B, 3, H, W) -> depth (B, 1, H, W)"""
        b, c, h, w = x.shape
        x = x * 2.0 - 1.0
        padded = h % 64 != 0
        if padded:
            new_x = torch.zeros(b, c, h + 32, w + 32)
            new_x[:, :, :h, :w] = x
            x = new_x
        conv_feats = self.encoder(x, class_ids)
        if padded:
            conv_feats = conv_feats[:, :, :-1, :-1]
        out = self.last_layer_depth(self.decoder(conv_feats))
        return torch.sigmoid(out) * self.max_depth


class VPDRefer(nn.Module):
    """refer/models_refer/model.py VPDRefer (SimpleDecoding, align_corners True); CLIP runs outside it."""

    def __init__(self, token_length: int, base_size: int = 64, seed: int = 0, arch=TINY):
        super().__init__()
        unet, self.encoder_vq = _sd_parts(seed, arch)
        self.unet = UNetWrapper(unet, base_size=base_size)
        dim = arch.unet.cross_attention_dim
        self.text_adapter = TextAdapter(dim)
        c = arch.unet.block_out_channels
        self.classifier = TorchSimpleDecoding(c[0], c[1] + token_length, c[2] + token_length, c[3])
        self.gamma = nn.Parameter(torch.ones(dim) * 1e-4)
        randomize_(self, seed + 2)

    def forward(self, img, l_feats):
        latents = _encode(self.encoder_vq, img)
        c_crossattn = self.text_adapter(latents, l_feats, self.gamma)
        t = torch.ones((img.shape[0],), dtype=torch.long)
        outs = self.unet(latents, t, c_crossattn=[c_crossattn])
        x_c1, x_c2, x_c3, x_c4 = outs
        return self.classifier(x_c4, x_c3, x_c2, x_c1, img.shape[-2:]), outs


def tiny_clip(seed: int = 0, arch=TINY):
    """The frozen CLIP text model refer runs outside VPDRefer (transformers CLIPTextModel, tiny preset shape)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = arch.text
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                            max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
                            eos_token_id=t.eos_token_id, bos_token_id=t.eos_token_id - 1,
                            pad_token_id=t.eos_token_id)
    return randomize_(CLIPTextModel(config), seed)


# ------------------------------------------------------------------------------------------------ the files


def ldm_state_dict(model: nn.Module, unet_prefix: str, vae_prefix: str, arch=TINY) -> "collections.OrderedDict":
    """model.state_dict() with the diffusers UNet / VAE keys under the prefixes renamed to ldm's names."""
    state = model.state_dict()
    out = collections.OrderedDict()
    unet = {k[len(unet_prefix):]: v for k, v in state.items() if k.startswith(unet_prefix)}
    vae = {k[len(vae_prefix):]: v for k, v in state.items() if k.startswith(vae_prefix)}
    for k, v in state.items():
        if not k.startswith((unet_prefix, vae_prefix)):
            out[k] = v
    out.update(unet_diffusers_to_ldm(unet, arch.unet.layers_per_block[0], prefix=unet_prefix))
    out.update(vae_diffusers_to_ldm(vae, prefix=vae_prefix))
    return out


def save_seg(model: VPDSeg, path: str) -> dict:
    """mmcv save_checkpoint's container: meta + state_dict (+ optimizer)."""
    state = ldm_state_dict(model, "unet.unet.diffusion_model.", "encoder_vq.")
    meta = {"mmseg_version": "0.30.0", "config": "model = dict(type='VPDSeg')", "iter": 80000, "epoch": 1,
            "CLASSES": tuple(f"class{i}" for i in range(model.decode_head.conv_seg.out_channels)),
            "PALETTE": [[0, 0, 0]] * model.decode_head.conv_seg.out_channels, "mmcv_version": "1.6.0",
            "time": "Thu Jan  1 00:00:00 2023"}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return state


def save_depth(model: VPDDepth, path: str, ddp: bool = True) -> dict:
    """depth/train.py's best.ckpt: {'model': state_dict}; the keys of a DDP-wrapped model carry 'module.'."""
    state = ldm_state_dict(model, "encoder.unet.unet.diffusion_model.", "encoder.encoder_vq.")
    if ddp:
        state = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
    torch.save({"model": state}, path)
    return state


def save_refer(model: VPDRefer, path: str, token_length: int) -> dict:
    """refer/train.py's model_best_<id>.pth: model, optimizer, epoch, args (an argparse.Namespace), lr_scheduler."""
    state = ldm_state_dict(model, "unet.unet.diffusion_model.", "encoder_vq.")
    args = argparse.Namespace(model_id="refcoco", token_length=token_length, img_size=512, lr=5e-5)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 39, "args": args,
                "lr_scheduler": {"last_epoch": 100}}, path)
    return state


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))
