"""Frozen DINO ViT-B/16 features, the VAEs, the Ada-GVAE and the training loop.

Dapueto et al. 2025 (Sec. II): Φ(x) = CLS token of a frozen DINO ViT-B/16 on the padded, 224×224,
ImageNet-normalised image; a VAE is trained on Φ (or on 64×64 pixels, the baseline) with the Ada-GVAE
weak supervision of Locatello et al. 2020 on the source, then finetuned as a β-VAE on the target.

Read top to bottom:
  1-4. ViT-B/16 with the DINO module layout (reference §B), DINO weight resolution (design §4),
       cached feature extraction and standardisation, a cross-check against torchvision's ViT.
  5.   Gaussian posteriors: KL terms (Kingma & Welling 2014, Eq. 10).
  6.   Ada-GVAE aggregation (Locatello et al. 2020, Eq. 6-7; disentanglement_lib `group_vae_argmax`).
  7.   Two VAEs sharing one protocol: the feature MLP-VAE on Φ and the disentanglement_lib convolutional
       VAE on 64×64 pixels. Both expose `loss(x, beta)` (β-VAE, Higgins et al. 2017, Eq. 4),
       `pair_loss(x1, x2, beta)` (Ada-GVAE) and `representation(x)` (μ); `se2.SE2VAE` exposes the same.
  8.   β warm-up, atomic checkpoints and `fit`, a resumable training loop whose every random draw is a pure
       function of (seed, step), so an interrupted run resumes to exactly the weights of an uninterrupted one.
"""
import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# 1. ViT-B/16 with the DINO module layout (state_dict loads the official checkpoint with strict=True)
# ---------------------------------------------------------------------------------------------------

DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
DINO_FILE = "dino_vitbase16_pretrain.pth"
VIT_B16_CONFIG = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4)
VIT_B16_GFLOP = 17.6                      # forward FLOPs of one 224×224 image (issue 6)
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Everything in preprocessing that changes the features; goes into the feature cache key.
PREPROCESSING = dict(size=IMAGE_SIZE, resize="bilinear-antialias", scale="uint8/255",
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → embed_dim tokens, row-major (B, H/p·W/p, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; qkv rows are [q; k; v], each split into contiguous 64-row heads."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, n_queries=None):
        """Attention of every token, or of the first `n_queries` tokens only (to all N keys)."""
        B, N, C = x.shape
        # (B, N, 3, heads, d) → (3, B, heads, N, d): the DINO reshape, viewed without a copy.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q = qkv[0] if n_queries is None else qkv[0][:, :, :n_queries]
        # softmax(q kᵀ / √d) v with the default scale d^-½ (DINO: head_dim ** -0.5).
        x = F.scaled_dot_product_attention(q, qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C))


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2 (dropout 0 in DINO)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1 x); x += mlp(norm2 x). Drop-path is 0."""

    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, cls_only=False):
        """cls_only: return the CLS token alone, (B, 1, D); the same numbers as forward(x)[:, :1], but the
        other tokens only serve as keys and values, so their attention rows, proj and MLP are skipped."""
        if cls_only:
            x = x[:, :1] + self.attn(self.norm1(x), n_queries=1)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO ViT; forward(x (B,3,H,W) float) → CLS token after the final norm, (B, embed_dim)."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # DINO's initialisation (irrelevant once weights are loaded; used by the tests' random models).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, n_patches, H, W):
        """DINO's pos-embed interpolation: unchanged for the training grid and a square image, else the
        patch grid is resized bicubically with scale_factor (H/p + 0.1)/√N, (W/p + 0.1)/√N — the +0.1
        avoids floor errors (dino#8); passing size= instead is NOT equivalent. CLS position untouched."""
        N = self.pos_embed.shape[1] - 1
        if n_patches == N and H == W:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        g = int(math.sqrt(N))
        h0, w0 = H // self.patch_size + 0.1, W // self.patch_size + 0.1
        grid = self.pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / g, w0 / g), mode="bicubic")
        if grid.shape[-2:] != (int(h0), int(w0)):
            raise ValueError(f"pos-embed interpolation gave grid {tuple(grid.shape[-2:])} for a {H}x{W} "
                             f"image, expected {(int(h0), int(w0))}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, x):
        """[CLS; patch tokens] + positional embedding, (B, 1 + H/p·W/p, D)."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, H, W)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        # Only the CLS token leaves the network, so the last block computes it alone: 6.3% of the 17.6
        # GMAC per 224×224 image skipped (its other tokens' attention rows, proj and MLP), exactly.
        return self.norm(self.blocks[-1](x, cls_only=True))[:, 0]


def vit_base(**kwargs):
    """DINO ViT-B/16: 150 tensors, 85,798,656 parameters (reference §B)."""
    return VisionTransformer(**{**VIT_B16_CONFIG, **kwargs})


# ---------------------------------------------------------------------------------------------------
# 2. DINO weights: resolution (design §4), loading, digest
# ---------------------------------------------------------------------------------------------------

def dino_hub_cache_path():
    """Where torch.hub keeps the official checkpoint: <torch.hub.get_dir()>/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", DINO_FILE)


def resolve_dino_weights(path=None, download=True):
    """Find DINO ViT-B/16 weights → (path, how): explicit path, env DRL_DINO_WEIGHTS, the torch hub
    cache, else download from the official release into that cache (download=False skips this)."""
    fix = (f"pass --dino-weights PATH, set DRL_DINO_WEIGHTS, or put {DINO_FILE} at "
           f"{dino_hub_cache_path()}")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DINO weights file {path} does not exist (--dino-weights PATH)")
        return str(path), "explicit path"
    env = os.environ.get("DRL_DINO_WEIGHTS")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"DRL_DINO_WEIGHTS={env} does not exist; point it at {DINO_FILE}")
        return env, "env DRL_DINO_WEIGHTS"
    cached = dino_hub_cache_path()
    if os.path.isfile(cached):
        return cached, "torch hub cache"
    if not download:
        raise FileNotFoundError(f"no DINO ViT-B/16 weights found: {fix}")
    try:
        # The file load_state_dict_from_url would cache, without loading it twice; downloads to a
        # temporary file and moves it into place only when complete.
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(DINO_URL, cached, progress=False)
    except Exception as e:  # offline: URLError, socket errors, HTTP errors, ...
        raise FileNotFoundError(f"no DINO ViT-B/16 weights found and the download failed "
                                f"({_one_line(e)}): {fix}") from None
    return cached, "downloaded"


def _one_line(e, limit=160):
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _names(keys, k=3):
    keys = sorted(keys)
    return ", ".join(keys[:k]) + (", ..." if len(keys) > k else "")


def dino_state_dict(obj):
    """Backbone state dict from a plain DINO state dict or a full training checkpoint: take
    "teacher", strip "module." and "backbone." prefixes, drop the DINO projection head "head.*"."""
    if isinstance(obj, dict) and "teacher" in obj:
        obj = obj["teacher"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError("not a state dict of tensors")
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("head."):
            sd[k] = v
    return sd


def load_dino(path=None, device="cpu", download=True, config=None):
    """Resolve and load DINO weights into VisionTransformer(**config) (default ViT-B/16) with
    strict=True; returns the model in eval mode with requires_grad False."""
    path, _ = resolve_dino_weights(path, download)
    model = VisionTransformer(**(config or VIT_B16_CONFIG))
    # DINO's full training checkpoints also pickle their argparse.Namespace "args"; allow just that.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = dino_state_dict(obj)
    except Exception as e:
        raise ValueError(f"cannot read DINO weights {path} ({_one_line(e)}); need the DINO ViT-B/16 "
                         f"{DINO_FILE} or a DINO training checkpoint (--dino-weights PATH)") from None
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if len(missing) == len(expected):
        raise ValueError(f"{path} is not a DINO ViT checkpoint: none of the {len(expected)} expected "
                         f"keys found (it has {len(sd)} keys such as {_names(sd)}); need {DINO_FILE}")
    if missing or unexpected:
        raise ValueError(f"DINO weights {path} do not match the ViT: {len(missing)} missing keys "
                         f"({_names(missing)}), {len(unexpected)} unexpected keys ({_names(unexpected)})")
    bad = [k for k in expected if sd[k].shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"DINO weights {path}: {len(bad)} tensors have the wrong shape, e.g. {k} "
                         f"{tuple(sd[k].shape)} instead of {tuple(expected[k].shape)} (need ViT-B/16)")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval().requires_grad_(False)


_DIGESTS = {}


def weights_digest(path):
    """sha256 hex digest of a file, memoised by (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# ---------------------------------------------------------------------------------------------------
# 3. Feature extraction with an atomic .npy memmap cache; source standardisation
# ---------------------------------------------------------------------------------------------------

def preprocess_images(images, device="cpu", size=IMAGE_SIZE):
    """uint8 (b,H,W,3) RGB → float32 (b,3,size,size): /255, bilinear antialiased resize, ImageNet
    mean/std (reference §B normalisation).

    Fast path (2.5× on 64→224; test_preprocess_fast_path_equals_plain): x/255 then (x − mean)/std is
    one affine map per channel, and bilinear weights sum to 1, so it commutes with the resize and is
    applied to the small image. Antialiasing only changes a downscale (for an upscale the antialiased
    kernel IS the bilinear one, equal to 3e-15 in float64), so the plain, faster kernel upscales."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).contiguous().float().mul_(1.0 / (255.0 * std)).sub_(mean / std)
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def feature_cache_key(**parts):
    """Short sha256 over a canonical JSON of everything that changes the features (dataset digest,
    weights digest, preprocessing, precision, image size, ...). The caller builds the file name."""
    def plain(o):
        if isinstance(o, (np.generic, np.ndarray)):
            return o.tolist()
        raise ValueError(f"feature cache key part of type {type(o).__name__} is not JSON-able")
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def keep_freed_memory():
    """Let glibc's malloc keep freed memory for the next allocation instead of handing it back to the OS.

    By default glibc unmaps (or trims) freed blocks of a few MB, and every new activation of that size is
    page-faulted back in and zeroed: 12,900 minor page faults per ViT-B/16 image at batch 4, about a tenth
    of its time on a 2-core CPU (torch profiler: copy_ 12 %, the first write into each fresh addmm output).
    With the mmap threshold at glibc's 32 MB maximum and trimming off, the ViT runs without page faults as
    long as a single activation stays under 32 MB (extraction batch 8 on a CPU). The process keeps its peak
    heap. Returns True where applied (glibc), False elsewhere (nothing changes)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def cpu_bf16_supported():
    """True when oneDNN has fast bf16 kernels on this CPU (AVX-512 / AVX512-BF16 / AMX); without them
    bf16 autocast on the CPU is emulated and much slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(precision, device):
    if precision == "fp32":
        return torch.autocast(torch.device(device).type, enabled=False)
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r} is not supported, use fp32 or bf16 (--precision)")


def extract_features(model, images_fn, n, cache_path, batch_size=None, precision="fp32", device="cpu",
                     progress=None):
    """Φ for images_fn(idx) → uint8 (b,H,W,3), idx = 0..n-1, as a read-only (n, D) float32 memmap.
    Reuses cache_path when it holds (n, D) float32; otherwise streams batches into a temporary .npy
    next to it and renames it to cache_path only when complete. progress(done, n) is optional.
    batch_size None: 64 on a GPU; 8 on a CPU, where larger batches are no faster and their activations
    outgrow what keep_freed_memory can recycle."""
    D = model.embed_dim
    if batch_size is None:
        batch_size = 8 if torch.device(device).type == "cpu" else 64
    if n < 1:
        raise ValueError(f"cannot extract features of {n} images, need at least one")
    _autocast(precision, device)  # validates precision before any work
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_bf16_supported():
        warnings.warn("bf16 autocast on a CPU without native bf16 support is slower than fp32 here; "
                      "consider --precision fp32")
    if os.path.exists(cache_path):
        try:
            cached = np.load(cache_path, mmap_mode="r")
            if cached.shape == (n, D) and cached.dtype == np.float32:
                return cached
            reason = f"shape {cached.shape} {cached.dtype}"
        except (ValueError, OSError) as e:
            reason = _one_line(e)
        warnings.warn(f"feature cache {cache_path} ({reason}) does not match ({n}, {D}) float32; recomputing")
    folder = os.path.dirname(os.path.abspath(cache_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(cache_path) + ".", suffix=".tmp")
    os.close(fd)
    out = None
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, D))
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                images = images_fn(np.arange(start, stop))
                if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
                        or images.shape[0] != stop - start or images.shape[-1] != 3):
                    raise ValueError(f"images_fn returned {getattr(images, 'dtype', type(images))} "
                                     f"{getattr(images, 'shape', '')}, need uint8 ({stop - start}, H, W, 3)")
                x = preprocess_images(images, device)
                with _autocast(precision, device):
                    f = model(x)
                out[start:stop] = f.float().cpu().numpy()
                if progress is not None:
                    progress(stop, n)
        out.flush()
        del out
        out = None
        os.replace(tmp, cache_path)
    except BaseException:
        del out
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return np.load(cache_path, mmap_mode="r")


def feature_stats(features, chunk=4096):
    """Per-dimension mean and std (population, floored at 1e-6) of source features, float32 (D,).
    Streams over rows in float64 so a memmap is never loaded whole."""
    n = len(features)
    s = np.zeros(features.shape[1], np.float64)
    for i in range(0, n, chunk):
        s += np.asarray(features[i:i + chunk], np.float64).sum(0)
    mean = s / n
    ss = np.zeros_like(mean)
    for i in range(0, n, chunk):
        ss += ((np.asarray(features[i:i + chunk], np.float64) - mean) ** 2).sum(0)
    std = np.maximum(np.sqrt(ss / n), 1e-6)
    return mean.astype(np.float32), std.astype(np.float32)


def standardise(features, mean, std):
    """(features - mean) / std with the *source* statistics (stored in checkpoints, applied unchanged
    to targets). numpy in → float32 numpy out; torch in → torch out."""
    if torch.is_tensor(features):
        mean = torch.as_tensor(mean, dtype=features.dtype, device=features.device)
        std = torch.as_tensor(std, dtype=features.dtype, device=features.device)
        return (features - mean) / std
    return ((np.asarray(features, np.float32) - mean) / std).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# 4. Cross-check against torchvision's ViT (tests and bench.py only; torchvision imported lazily)
# ---------------------------------------------------------------------------------------------------

_TV_BLOCK_KEYS = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
                  "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
                  "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}


def dino_to_torchvision_state_dict(sd):
    """Rename DINO/our keys to torchvision.models.VisionTransformer keys (no classification head).
    Both use q,k,v stacked row-wise with contiguous heads, so tensors are copied unchanged."""
    out = {}
    for k, v in sd.items():
        if k == "cls_token":
            name = "class_token"
        elif k == "pos_embed":
            name = "encoder.pos_embedding"
        elif k.startswith("patch_embed.proj."):
            name = "conv_proj." + k[len("patch_embed.proj."):]
        elif k.startswith("norm."):
            name = "encoder.ln." + k[len("norm."):]
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            old = next((o for o in _TV_BLOCK_KEYS if rest == o or rest.startswith(o + ".")), None)
            if old is None:
                raise ValueError(f"no torchvision name for ViT key {k}")
            name = f"encoder.layers.encoder_layer_{i}." + _TV_BLOCK_KEYS[old] + rest[len(old):]
        else:
            raise ValueError(f"no torchvision name for ViT key {k}")
        out[name] = v
    return out


def torchvision_reference(model):
    """torchvision VisionTransformer with `model`'s config and weights, heads replaced by Identity so
    that forward returns encoder.ln output token 0 — the same quantity as model(x). Eval, frozen."""
    import torchvision
    c = model.config
    tv = torchvision.models.VisionTransformer(
        image_size=c["img_size"], patch_size=c["patch_size"], num_layers=c["depth"],
        num_heads=c["num_heads"], hidden_dim=c["embed_dim"], mlp_dim=int(c["embed_dim"] * c["mlp_ratio"]))
    tv.heads = nn.Identity()
    tv.load_state_dict(dino_to_torchvision_state_dict(model.state_dict()), strict=True)
    return tv.to(model.cls_token.device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# 5. Gaussian posteriors q(z|x) = N(mu, diag(exp(logvar)))
# ----------------------------------------------------------------------------------------------------------


def kl_normal(mu, logvar):
    """Per-dimension KL(N(mu, σ²) ‖ N(0, 1)) = ½(μ² + σ² − ln σ² − 1) (Kingma & Welling 2014, Eq. 10)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def kl_gaussians(mu1, logvar1, mu2, logvar2):
    """Per-dimension KL(N(mu1, σ1²) ‖ N(mu2, σ2²)) = ½(σ1²/σ2² + (μ2−μ1)²/σ2² − 1 + ln σ2² − ln σ1²)."""
    var_ratio = (logvar1 - logvar2).exp()
    return 0.5 * (var_ratio + (mu2 - mu1).pow(2) / logvar2.exp() - 1.0 + logvar2 - logvar1)


def reparameterise(mu, logvar, noise=None):
    """z = μ + σ·ε, ε ~ N(0, I) (Kingma & Welling 2014, Eq. 4); `noise` supplies ε (else drawn here)."""
    return mu + (0.5 * logvar).exp() * (torch.randn_like(mu) if noise is None else noise)


# ----------------------------------------------------------------------------------------------------------
# 6. Ada-GVAE (Locatello et al. 2020): the two images of a pair share every factor but one (k = 1), so the
#    latent dims that barely move between them are forced to agree.
# ----------------------------------------------------------------------------------------------------------


def ada_gvae_shared(delta):
    """Which dims are shared, per example: δ_j < τ = ½(max_j δ_j + min_j δ_j) (Locatello et al. 2020, Eq. 7).

    disentanglement_lib puts δ into two equal-width bins over [min δ, max δ]; the lower bin is shared.
    When all δ_j are equal the bins are undefined (0/0 in TensorFlow); we share every dim.
    """
    d_max, d_min = delta.max(dim=1, keepdim=True).values, delta.min(dim=1, keepdim=True).values
    tau = 0.5 * (d_max + d_min)
    return (delta < tau) | (d_max == d_min)


def ada_gvae_aggregate(mu1, logvar1, mu2, logvar2):
    """Replace the shared dims of both posteriors by their average (Locatello et al. 2020, Eq. 6, GVAE).

    δ_j = KL(q(z_j|x1) ‖ q(z_j|x2)) (one direction, as disentanglement_lib); the average posterior has
    μ̄ = ½(μ1 + μ2) and σ̄² = ½(σ1² + σ2²). Returns (mu1, logvar1, mu2, logvar2, shared).
    """
    shared = ada_gvae_shared(kl_gaussians(mu1, logvar1, mu2, logvar2))
    mu_avg = 0.5 * (mu1 + mu2)
    logvar_avg = torch.log(0.5 * (logvar1.exp() + logvar2.exp()))
    return (torch.where(shared, mu_avg, mu1), torch.where(shared, logvar_avg, logvar1),
            torch.where(shared, mu_avg, mu2), torch.where(shared, logvar_avg, logvar2), shared)


# ----------------------------------------------------------------------------------------------------------
# 7. VAEs. A subclass defines encode(x) -> (mu, logvar), decode(z) -> x_hat and reconstruction(x, x_hat)
#    -> per-example negative log-likelihood; the losses are shared.
# ----------------------------------------------------------------------------------------------------------


class GaussianVAE(nn.Module):
    """VAE with a diagonal Gaussian posterior and a N(0, I) prior."""

    def loss(self, x, beta, noise=None):
        """β-VAE: E[−ln p(x|z)] + β·KL(q(z|x) ‖ p(z)), batch mean (Higgins et al. 2017, Eq. 4).

        `noise` (n, latent) replaces the ε drawn inside (used to train several models in lock-step).
        """
        mu, logvar = self.encode(x)
        recon = self.reconstruction(x, self.decode(reparameterise(mu, logvar, noise))).mean()
        kl = kl_normal(mu, logvar).sum(dim=1).mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    def pair_loss(self, x1, x2, beta, noise=None):
        """Ada-GVAE: ½(R1 + R2) + β·½(KL(q̃1 ‖ p) + KL(q̃2 ‖ p)), batch mean (Locatello et al. 2020, Eq. 8).

        Both images go through the encoder and the decoder as one batch of 2n; `noise` is (2n, latent).
        """
        n = x1.shape[0]
        mu, logvar = self.encode(torch.cat([x1, x2]))
        mu1, logvar1, mu2, logvar2, _ = ada_gvae_aggregate(mu[:n], logvar[:n], mu[n:], logvar[n:])
        mu, logvar = torch.cat([mu1, mu2]), torch.cat([logvar1, logvar2])
        recon = self.reconstruction(torch.cat([x1, x2]), self.decode(reparameterise(mu, logvar, noise))).mean()
        kl = kl_normal(mu, logvar).sum(dim=1).mean()  # the mean over 2n examples is ½(KL1 + KL2)
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def representation(self, x):
        """The code used downstream: the posterior mean μ."""
        return self.encode(x)[0]


class FeatureVAE(GaussianVAE):
    """MLP-VAE on standardised DINO features Φ (official sizes: 768→h→2h→3h→(μ, ln σ²), mirrored decoder).

    Likelihood: Gaussian with fixed variance, i.e. the sum of squared errors over the 768 standardised
    dims. (The official code scales features to [0, 1] with fixed min/max and uses 768·MSE; on standardised
    features the plain sum has the same order of magnitude and no magic constants.)
    """

    def __init__(self, in_dim=768, hidden=512, latent_dim=10):
        super().__init__()
        self.config = {"kind": "feature", "in_dim": in_dim, "hidden": hidden, "latent_dim": latent_dim}
        h = hidden
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.encoder = nn.Sequential(nn.Linear(in_dim, h), act(), nn.Linear(h, 2 * h), act(),
                                     nn.Linear(2 * h, 3 * h), act(), nn.Linear(3 * h, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 3 * h), act(), nn.Linear(3 * h, 2 * h), act(),
                                     nn.Linear(2 * h, h), act(), nn.Linear(h, in_dim))

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)

    def decode(self, z):
        return self.decoder(z)

    def reconstruction(self, x, x_hat):
        return (x - x_hat).pow(2).sum(dim=1)


class ConvVAE(GaussianVAE):
    """The disentanglement_lib convolutional VAE for 64×64 images (Locatello et al. 2019, Table 1).

    Encoder: 4 × [conv 4×4 stride 2, ReLU] with 32, 32, 64, 64 channels, FC 256, FC 2·latent.
    Decoder: FC 256, FC 4·4·64, 4 × [transposed conv 4×4 stride 2] with 64, 32, 32, 3 channels.
    Likelihood: Bernoulli on pixels in [0, 1]; the decoder returns logits.
    """

    def __init__(self, latent_dim=10, in_ch=3, size=64):
        super().__init__()
        if size != 64:
            raise ValueError(f"ConvVAE expects 64x64 images, got size {size}")
        self.config = {"kind": "conv", "latent_dim": latent_dim, "in_ch": in_ch, "size": size}
        self.encoder = nn.Sequential(
            nn.Conv2d(in_ch, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 64 * 4 * 4), nn.ReLU(),
            nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, in_ch, 4, 2, 1))

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)

    def decode(self, z):
        return self.decoder(z)

    def reconstruction(self, x, x_hat):
        return F.binary_cross_entropy_with_logits(x_hat, x, reduction="none").flatten(1).sum(dim=1)


def model_config(model):
    """model.config plus the `kind` that build_model needs (se2.SE2VAE, a standalone module, has none)."""
    import se2
    return dict(model.config, kind="se2") if isinstance(model, se2.SE2VAE) else dict(model.config)


def build_model(config):
    """Rebuild a model from its `config` dict (as stored in every checkpoint)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "feature":
        return FeatureVAE(**config)
    if kind == "conv":
        return ConvVAE(**config)
    if kind == "se2":
        import se2
        return se2.SE2VAE(**config)
    raise ValueError(f"unknown model kind {kind!r} in checkpoint config")


# ----------------------------------------------------------------------------------------------------------
# 8. Training
# ----------------------------------------------------------------------------------------------------------


def beta_warmup(step, beta, warmup_steps):
    """Linear deterministic warm-up (Bowman et al. 2016): β·min(1, step / warmup_steps); β if no warm-up."""
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup_steps)


def save_checkpoint(path, obj):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Load a checkpoint written by `save_checkpoint` (tensors, numbers, strings, dicts only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, truncated files, foreign formats
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}; delete it to start afresh") from e


def step_seed(seed, step):
    """The seed of step `step` of run `seed`: every draw of a step depends on (seed, step) alone."""
    return (int(seed) * 1_000_003 + int(step)) % (2 ** 63)


class TrainingDiverged(ValueError):
    """A non-finite loss: the step is not applied and the last good checkpoint is kept."""


def _diverged(what, value, step, seed, beta, folder):
    """The one-line error for a non-finite loss or gradient norm."""
    return TrainingDiverged(f"{what} became {value} at step {step} (seed {seed}, beta {beta}); the last good "
                            f"checkpoint is kept in {folder}; lower --lr or check the input data")


def _clip_and_step(params, opt, grad_clip, step, seed, beta, folder):
    """Gradient-norm clipping (grad_clip 0 or None: none) and one optimiser step; a non-finite norm raises
    TrainingDiverged before the step. fit and fit_parallel both step through here, model by model."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if not torch.isfinite(grad_norm):
        raise _diverged("gradient", grad_norm.item(), step, seed, beta, folder)
    opt.step()


def check_config(path, saved, wanted):
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {path} was written with another configuration ({k}: {saved.get(k)!r} "
                         f"there, {wanted.get(k)!r} now); use another --out or delete that run folder")


def make_optimizer(params, optimizer="adam", *, lr=1e-4, weight_decay=0.0):
    """Adam (Kingma & Ba 2015) or AdamW (Loshchilov & Hutter 2019) over `params`, the fused kernel where the
    device has one: one pass over parameters, gradients and moments instead of one per arithmetic operation
    (5 instead of 21 ms per step for a FeatureVAE on 2 CPU cores, torch profiler)."""
    if optimizer not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r} (adam or adamw)")
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    make = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    return make(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def fit(model, batch_fn, *, steps, beta, folder, config, paired, lr=1e-4, optimizer="adam", weight_decay=0.0,
        warmup_steps=0, grad_clip=1.0, seed=0, device="cpu", checkpoint_every_s=120.0, log_every=50,
        progress=None, progress_every_s=5.0, extra=None):
    """Train `model` for `steps` optimiser steps, resuming from `folder/checkpoint.pt` when it exists.

    batch_fn(rng, step) returns x (β-VAE) or (x1, x2) (Ada-GVAE, `paired=True`) as tensors; rng is a numpy
    Generator seeded by (seed, step). The torch RNG (reparameterisation noise) is also re-seeded per step.
    `config` is every setting that defines the run; resuming against another config is an error.
    `extra` (dict of tensors/numbers) is stored in the checkpoint, e.g. feature standardisation statistics.
    `progress(dict)` is called every `progress_every_s` seconds. Writes folder/log.csv. Returns the checkpoint.
    """
    import numpy as np  # local: only the training loop needs numpy here

    os.makedirs(folder, exist_ok=True)
    ckpt_path, log_path = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "log.csv")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay)
    config = dict(config, model=model_config(model))
    start = 0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        check_config(ckpt_path, ckpt["config"], config)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        if start >= steps:
            return ckpt
    _trim_log(log_path, start)

    def checkpoint(step):
        ckpt = {"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "done": step >= steps, **(extra or {})}
        save_checkpoint(ckpt_path, ckpt)
        return ckpt

    model.train()
    t0 = last_ckpt = last_progress = time.time()
    sums, n_sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}, 0
    new_log = not os.path.exists(log_path)
    with open(log_path, "a", newline="") as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "loss", "recon", "kl", "beta", "seconds"])
        for step in range(start, steps):
            torch.manual_seed(step_seed(seed, step))
            batch = batch_fn(np.random.default_rng(step_seed(seed, step)), step)
            b = beta_warmup(step, beta, warmup_steps)
            out = model.pair_loss(*batch, b) if paired else model.loss(batch, b)
            if not torch.isfinite(out["loss"]):
                raise _diverged("loss", out["loss"].item(), step, seed, beta, folder)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            _clip_and_step(params, opt, grad_clip, step, seed, beta, folder)
            for k in sums:
                sums[k] += out[k].item()
            n_sums += 1
            done = step + 1
            if done % log_every == 0 or done == steps:
                log.writerow([done] + [f"{sums[k] / n_sums:.6g}" for k in sums] + [f"{b:.4g}",
                                                                                    f"{time.time() - t0:.1f}"])
                log_file.flush()
            now = time.time()
            if progress and (now - last_progress >= progress_every_s or done == steps):
                rate = (done - start) / max(now - t0, 1e-9)
                progress({"step": done, "steps": steps, **{k: sums[k] / n_sums for k in sums}, "beta": b,
                          "steps_per_s": rate, "eta_s": (steps - done) / max(rate, 1e-9)})
                last_progress = now
            if done % log_every == 0:
                sums, n_sums = {k: 0.0 for k in sums}, 0
            if now - last_ckpt >= checkpoint_every_s and done < steps:
                checkpoint(done)
                last_ckpt = now
    return checkpoint(steps)


def _trim_log(log_path, step):
    """Drop log rows past `step` (written after the last checkpoint of an interrupted run)."""
    if not os.path.exists(log_path):
        return
    with open(log_path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    if len(keep) != len(rows):
        tmp = log_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        os.replace(tmp, log_path)


def load_model(path, device="cpu"):
    """Rebuild the model stored in a checkpoint; returns (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt["config"]["model"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"checkpoint {path} does not match its model configuration "
                         f"({type(e).__name__}); delete it and train again") from e
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------------
# 9. Vectorised sweep: every seed × β of a sweep trained in one process with stacked weights (issue 6).
#    Model m of the stack is the model `fit` trains alone for (seeds[m], betas[m]): same batches, same
#    noise, same clipping, same Adam arithmetic, same checkpoints and logs, so either can resume the other.
# ----------------------------------------------------------------------------------------------------------

# Layers the stacked forward knows; anything else (BatchNorm, the SE(2,N) layers) is refused.
_STACKABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, nn.LeakyReLU, nn.Flatten, nn.Unflatten)


def _check_stackable(models):
    """All models one class (FeatureVAE or ConvVAE) and one config, built only from `_STACKABLE` layers."""
    if not models:
        raise ValueError("fit_parallel needs at least one model")
    first = models[0]
    if type(first) not in (FeatureVAE, ConvVAE):
        raise ValueError(f"{type(first).__name__} cannot be trained with stacked weights (only FeatureVAE and "
                         f"ConvVAE can; BatchNorm/SE(2,N) layers keep per-model state); drop --parallel-models")
    for m in models:
        if type(m) is not type(first) or m.config != first.config:
            raise ValueError(f"fit_parallel needs models of one architecture, got {first.config} and {m.config}; "
                             f"drop --parallel-models")
        bad = [type(layer).__name__ for seq in (m.encoder, m.decoder) for layer in seq
               if not isinstance(layer, _STACKABLE)]
        if bad or any(True for _ in m.buffers()):
            raise ValueError(f"layer {bad[0] if bad else 'with buffers'} cannot be stacked; drop --parallel-models")


class _StackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b for M models at once: x (M, n, in), W (M, out, in), b (M, out) or None.

    Forward and backward call the batched GEMMs in the orientation nn.Linear's autograd uses for one model
    (addmm with the bias as accumulator; ∂W = gyᵀ x, not (xᵀ gy)ᵀ as plain bmm autograd would), so every
    model gets bitwise nn.Linear's numbers; with another orientation the GEMM kernels round differently.
    """

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)) if b is not None else torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = torch.bmm(gy, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(gy.transpose(1, 2), x)
        gb = gy.sum(dim=1) if ctx.has_bias else None
        return gx, gw, gb


def _stacked_sequential(seq, params, prefix, x):
    """Run the nn.Sequential `seq` of M models at once: params[f'{prefix}.{i}.weight'] is (M, ...), x (M, n, ...)."""
    for i, layer in enumerate(seq):
        w, b = params.get(f"{prefix}.{i}.weight"), params.get(f"{prefix}.{i}.bias")
        if isinstance(layer, nn.Linear):  # one batched GEMM for all models (vmap(F.linear) is not bitwise)
            x = _StackedLinear.apply(x, w, b)
        elif w is not None:
            # Convolutions model by model: vmap would turn them into one grouped convolution, whose kernels
            # round differently, and Adam amplifies that past 1e-5 within 20 steps. (unbind, not x[m]: its
            # backward is one stack, not M scatters into zeros.)
            ps = [dict(weight=wm) for wm in w.unbind(0)]
            for pm, bm in zip(ps, b.unbind(0) if b is not None else []):
                pm["bias"] = bm
            x = torch.stack([torch.func.functional_call(layer, pm, (xm,)) for xm, pm in zip(x.unbind(0), ps)])
        else:  # parameter-free: activations, Flatten, Unflatten
            x = torch.vmap(layer)(x)
    return x


def _stacked_losses(model, params, batch, beta, noise, paired):
    """GaussianVAE.loss / pair_loss for M models at once; batch tensors (M, n, ...), beta (M,); returns (M,)s.

    Same operations as section 7 on the same per-model numbers: the (M, n) leading dims are flattened to
    (M·n) wherever the section 5-7 functions reduce over the last dim only.
    """
    if paired:
        x1, x2 = batch
        M, n = x1.shape[:2]
        x = torch.cat([x1, x2], dim=1)  # each model's batch is cat([x1, x2]), as in pair_loss
        mu, logvar = _stacked_sequential(model.encoder, params, "encoder", x).chunk(2, dim=-1)
        flat = lambda t: t.reshape(M * n, -1)  # noqa: E731
        mu1, logvar1, mu2, logvar2, _ = ada_gvae_aggregate(flat(mu[:, :n]), flat(logvar[:, :n]),
                                                           flat(mu[:, n:]), flat(logvar[:, n:]))
        mu = torch.cat([mu1.view(M, n, -1), mu2.view(M, n, -1)], dim=1)
        logvar = torch.cat([logvar1.view(M, n, -1), logvar2.view(M, n, -1)], dim=1)
    else:
        x = batch
        M = x.shape[0]
        mu, logvar = _stacked_sequential(model.encoder, params, "encoder", x).chunk(2, dim=-1)
    x_hat = _stacked_sequential(model.decoder, params, "decoder", reparameterise(mu, logvar, noise))
    recon = model.reconstruction(x.flatten(0, 1), x_hat.flatten(0, 1)).view(M, -1).mean(dim=1)
    kl = kl_normal(mu, logvar).sum(dim=-1).mean(dim=1)
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def _per_model(value, n, what):
    """A shared value (callable / dict / None) or a list of n of them -> a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"fit_parallel got {len(value)} {what} for {n} models")
        return list(value)
    return [value] * n


def fit_parallel(models, batch_fn, *, steps, betas, seeds, folders, configs, paired, lr=1e-4, optimizer="adam",
                 weight_decay=0.0, warmup_steps=0, grad_clip=1.0, device="cpu", checkpoint_every_s=120.0,
                 log_every=50, progress=None, progress_every_s=5.0, extra=None):
    """`fit` for M models at once: model m is trained as fit(models[m], batch_fn, beta=betas[m], seed=seeds[m],
    folder=folders[m], config=configs[m], ...) would train it, with all weights stacked into (M, ...) tensors.

    batch_fn (and extra) is shared by all models or a list with one per model; like in `fit` it must be a
    pure function of (rng, step), so models with the same seed (β = 1 and β = 2) reuse one batch.
    Each folder gets fit's checkpoint.pt and log.csv; finished models are skipped, checkpoints resume
    (models at different steps are first brought level, the laggards trained alone in stacks).
    `progress(dict)` gets fit's keys averaged over the models plus "models" and "model_steps_per_s".
    A non-finite loss or gradient raises TrainingDiverged; every model keeps its last checkpoint.
    Returns the final checkpoint of every model, in order.
    """
    n = len(models)
    betas, seeds, folders, configs = (_per_model(v, n, w) for v, w in
                                      ((betas, "betas"), (seeds, "seeds"), (folders, "folders"), (configs, "configs")))
    fns, extras = _per_model(batch_fn, n, "batch_fns"), _per_model(extra, n, "extras")
    _check_stackable(models)
    runs = []
    for m, model in enumerate(models):
        os.makedirs(folders[m], exist_ok=True)
        model.to(device)
        # fit's optimiser: it loads and writes fit's checkpoints; _fit_stacked steps one loaded with its state
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr=lr,
                             weight_decay=weight_decay)
        run = {"model": model, "opt": opt, "fn": fns[m], "seed": seeds[m], "beta": betas[m], "folder": folders[m],
               "config": dict(configs[m], model=model_config(model)), "extra": extras[m], "start": 0,
               "ckpt_path": os.path.join(folders[m], "checkpoint.pt"), "ckpt": None}
        if os.path.exists(run["ckpt_path"]):
            ckpt = load_checkpoint(run["ckpt_path"])
            check_config(run["ckpt_path"], ckpt["config"], run["config"])
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            run["start"], run["ckpt"] = ckpt["step"], ckpt
        runs.append(run)
    # Bring every model to the same step: phase k trains the models that have reached the k-th distinct start.
    starts = sorted({r["start"] for r in runs if r["start"] < steps})
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else steps
        _fit_stacked([r for r in runs if r["start"] <= start], start, stop, steps=steps, paired=paired,
                     optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                     grad_clip=grad_clip, device=device, checkpoint_every_s=checkpoint_every_s,
                     log_every=log_every, progress=progress, progress_every_s=progress_every_s)
    return [r["ckpt"] for r in runs]


def _check_finite(values, what, step, runs):
    """values (M,), one per stacked model: TrainingDiverged naming the first model whose value is not finite."""
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        m = int(bad[0])
        raise _diverged(what, values[m].item(), step, runs[m]["seed"], runs[m]["beta"], runs[m]["folder"])


def _fit_stacked(runs, start, stop, *, steps, paired, optimizer, lr, weight_decay, warmup_steps, grad_clip, device,
                 checkpoint_every_s, log_every, progress, progress_every_s):
    """Train the models of `runs`, all at step `start`, to step `stop`; checkpoint them there."""
    import numpy as np  # local, as in fit

    M, template = len(runs), runs[0]["model"]
    names = [k for k, p in template.named_parameters() if p.requires_grad]
    # Stacked weights (M, ...) for the batched forward/backward. Model m's slices params[k][m] are detached
    # views (leaves sharing the stack's storage) given to an optimiser loaded with model m's state: clipping
    # and the optimiser step then run model by model with fit's code on tensors of fit's shapes, so every
    # model gets fit's numbers bitwise, and each step writes straight into the stack.
    params, _ = torch.func.stack_module_state([r["model"] for r in runs])  # leaves on the models' device
    params = {k: params[k] for k in names}
    views = [[params[k].detach()[m] for k in names] for m in range(M)]
    opts = []
    for r, v in zip(runs, views):
        opt = make_optimizer(v, optimizer, lr=lr, weight_decay=weight_decay)
        opt.load_state_dict(r["opt"].state_dict())
        opts.append(opt)
    latent_dim = template.config["latent_dim"]

    def checkpoint(step):
        """Copy model m of the stack back into runs[m]'s model and optimiser; write fit's checkpoint."""
        with torch.no_grad():
            for r, v, opt in zip(runs, views, opts):
                own = dict(r["model"].named_parameters())
                for k, vk in zip(names, v):
                    own[k].copy_(vk)
                r["opt"].load_state_dict(opt.state_dict())
                r["ckpt"] = {"config": r["config"], "model": r["model"].state_dict(),
                             "optimizer": r["opt"].state_dict(), "step": step, "done": step >= steps,
                             **(r["extra"] or {})}
                save_checkpoint(r["ckpt_path"], r["ckpt"])

    t0 = last_ckpt = last_progress = time.time()
    sums, n_sums = torch.zeros(M, 3, dtype=torch.float64), 0
    logs = []
    with contextlib.ExitStack() as files:
        for r in runs:
            log_path = os.path.join(r["folder"], "log.csv")
            _trim_log(log_path, start)
            new_log = not os.path.exists(log_path)
            f = files.enter_context(open(log_path, "a", newline=""))
            logs.append((f, csv.writer(f)))
            if new_log:
                logs[-1][1].writerow(["step", "loss", "recon", "kl", "beta", "seconds"])
        for step in range(start, stop):
            # Per (batch_fn, seed): fit's draws in fit's order: seed, batch from the numpy rng, then ε.
            drawn, batches, noises = {}, [], []
            for r in runs:
                key = (id(r["fn"]), r["seed"])
                if key not in drawn:
                    torch.manual_seed(step_seed(r["seed"], step))
                    batch = r["fn"](np.random.default_rng(step_seed(r["seed"], step)), step)
                    n_noise = 2 * batch[0].shape[0] if paired else batch.shape[0]
                    drawn[key] = (batch, torch.randn(n_noise, latent_dim, device=device))
                batches.append(drawn[key][0])
                noises.append(drawn[key][1])
            batch = (tuple(torch.stack([b[i] for b in batches]).to(device) for i in range(2)) if paired
                     else torch.stack(batches).to(device))
            b = [beta_warmup(step, r["beta"], warmup_steps) for r in runs]
            out = _stacked_losses(template, params, batch, torch.tensor(b, device=device), torch.stack(noises),
                                  paired)
            _check_finite(out["loss"], "loss", step, runs)
            for p in params.values():
                p.grad = None
            out["loss"].sum().backward()  # d(Σ_m loss_m)/d(loss_m) = 1: each model gets its own gradient
            for m, (v, opt) in enumerate(zip(views, opts)):  # fit's clip + step, on model m's slices
                for k, vk in zip(names, v):
                    vk.grad = params[k].grad[m]
                _clip_and_step(v, opt, grad_clip, step, runs[m]["seed"], runs[m]["beta"], runs[m]["folder"])
            sums += torch.stack([out[k].detach() for k in ("loss", "recon", "kl")], dim=1).double()
            n_sums += 1
            done = step + 1
            if done % log_every == 0 or done == steps:
                for m, (f, log) in enumerate(logs):
                    log.writerow([done] + [f"{v / n_sums:.6g}" for v in sums[m].tolist()]
                                 + [f"{b[m]:.4g}", f"{time.time() - t0:.1f}"])
                    f.flush()
            now = time.time()
            if progress and (now - last_progress >= progress_every_s or done == steps):
                rate = (done - start) / max(now - t0, 1e-9)
                mean = (sums / n_sums).mean(dim=0).tolist()
                progress({"step": done, "steps": steps, "loss": mean[0], "recon": mean[1], "kl": mean[2],
                          "beta": sum(b) / M, "steps_per_s": rate, "eta_s": (steps - done) / max(rate, 1e-9),
                          "models": M, "model_steps_per_s": M * rate})
                last_progress = now
            if done % log_every == 0:
                sums, n_sums = torch.zeros(M, 3, dtype=torch.float64), 0
            if now - last_ckpt >= checkpoint_every_s and done < stop:
                checkpoint(done)
                last_ckpt = now
    checkpoint(stop)
    for r in runs:
        r["start"] = stop
