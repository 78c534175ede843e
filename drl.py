"""Frozen DINO ViT-B/16 features, the VAEs and their losses.

Dapueto et al. 2025 (Sec. II): Φ(x) = CLS token of a frozen DINO ViT-B/16 on the padded, 224×224,
ImageNet-normalised image; a VAE is trained on Φ (or on 64×64 pixels, the baseline) with the Ada-GVAE
weak supervision of Locatello et al. 2020 on the source, then finetuned as a β-VAE on the target.

Read top to bottom: sections 1-4 are the method (the ViT, Gaussian posteriors, Ada-GVAE, the VAEs, each called as
model(batch, beta) -> dict(loss, recon, kl) as se2.SE2VAE is), 5-7 the machinery (weights, feature extraction, files).
The training loop lives in train.py.
"""
import argparse
import contextlib
import copy
import os
import re
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --- 1. ViT-B/16 with the DINO module layout (state_dict loads the official checkpoint with strict=True) ---------

DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
DINO_FILE = "dino_vitbase16_pretrain.pth"
VIT_B16_CONFIG = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4)
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
        self.patch_size, self.embed_dim = patch_size, embed_dim
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

    def prepare_tokens(self, x):
        """[CLS; patch tokens] + positional embedding, (B, 1 + N, D). The pipeline feeds img_size × img_size
        images only, so DINO's interpolation of the embedding to other sizes is left out."""
        x = self.patch_embed(x)
        return torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1) + self.pos_embed

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        # Only the CLS token leaves the network, so the last block computes it alone: 6.3% of the 17.6
        # GMAC per 224×224 image skipped (its other tokens' attention rows, proj and MLP), exactly.
        return self.norm(self.blocks[-1](x, cls_only=True))[:, 0]


def vit_base(**kwargs):
    """DINO ViT-B/16: 150 tensors, 85,798,656 parameters (facebookresearch/dino's vit_base)."""
    return VisionTransformer(**{**VIT_B16_CONFIG, **kwargs})


# --- 2. Gaussian posteriors q(z|x) = N(mu, diag(exp(logvar))) ----------------------------------------------------

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


# --- 3. Ada-GVAE (Locatello et al. 2020): the two images of a pair share every factor but one (k = 1), so the
#    latent dims that barely move between them are forced to agree.

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
    logvar_avg = torch.log(0.5 * (logvar1.exp() + logvar2.exp()))  # as disentanglement_lib (exp, mean, log)
    return (torch.where(shared, mu_avg, mu1), torch.where(shared, logvar_avg, logvar1),
            torch.where(shared, mu_avg, mu2), torch.where(shared, logvar_avg, logvar2), shared)


# --- 4. VAEs. A subclass builds `encoder` (x -> [mu; logvar]) and `decoder` (z -> x_hat) and defines
#    reconstruction(x, x_hat) -> per-example negative log-likelihood; the losses are shared.

class GaussianVAE(nn.Module):
    """VAE with a diagonal Gaussian posterior and a N(0, I) prior.

    model(batch, beta) is the training objective: the β-VAE loss of a batch of images, or the Ada-GVAE loss
    of a pair batch (x1, x2). `noise` supplies ε of the reparameterisation (else it is drawn inside); the
    training loop passes it when it trains several models at once through torch.vmap.
    """

    def forward(self, batch, beta, noise=None):
        if isinstance(batch, (tuple, list)):
            return self.pair_loss(*batch, beta, noise)
        return self.loss(batch, beta, noise)

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)

    def decode(self, z):
        return self.decoder(z)

    def loss(self, x, beta, noise=None):
        """β-VAE: E[−ln p(x|z)] + β·KL(q(z|x) ‖ p(z)), batch mean (Higgins et al. 2017, Eq. 4)."""
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
    """MLP-VAE on standardised features Φ (official sizes: 768→h→2h→3h→(μ, ln σ²), mirrored decoder).

    Likelihood: Gaussian with fixed variance, i.e. the sum of squared errors over the standardised dims.
    (The official code scales features to [0, 1] with fixed min/max and uses 768·MSE; on standardised
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

    def reconstruction(self, x, x_hat):
        return F.binary_cross_entropy_with_logits(x_hat, x, reduction="none").flatten(1).sum(dim=1)


def beta_warmup(step, beta, warmup_steps):
    """Linear deterministic warm-up (Bowman et al. 2016): β·min(1, step / warmup_steps); β if no warm-up."""
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup_steps)


# --- The machinery: weight files, other backbones, feature extraction, files. Nothing below is in the paper's
# equations; a reader of the method can stop here.

# --- 5. DINO weights: resolution and loading ---------------------------------------------------------------------

def resolve_dino_weights(path=None, download=True):
    """Find DINO ViT-B/16 weights → (path, how): explicit path, env DRL_DINO_WEIGHTS, the torch hub
    cache, else download from the official release into that cache (download=False skips this)."""
    return _resolve_weights("DINO ViT-B/16", DINO_URL, path or os.environ.get("DRL_DINO_WEIGHTS"),
                            "explicit path" if path else "env DRL_DINO_WEIGHTS", download,
                            "--dino-weights PATH, set DRL_DINO_WEIGHTS,")


def _resolve_weights(what, url, path, how, download, flags, hash_prefix=None):
    """An explicit file (`how` says where it came from), else <torch hub dir>/checkpoints/<url's file name>,
    else a download into that place (atomic: torch.hub moves the file there only when complete)."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    fix = f"pass {flags} or put {os.path.basename(url)} at {cached}"
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} weights file {path} ({how}) does not exist; {fix}")
        return str(path), how
    if os.path.isfile(cached):
        return cached, "torch hub cache"
    if not download:
        raise FileNotFoundError(f"no {what} weights found: {fix}")
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(url, cached, hash_prefix=hash_prefix, progress=False)
    except Exception as e:  # offline: URLError, socket errors, HTTP errors, a wrong hash, ...
        raise FileNotFoundError(f"no {what} weights found and the download failed ({one_line(e)}): "
                                f"{fix}") from None
    return cached, "downloaded"


def one_line(e, limit=160):
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _names(keys, k=3):
    return ", ".join(sorted(keys)[:k]) + (", ..." if len(keys) > k else "")


def dino_state_dict(obj):
    """Backbone state dict from a plain DINO state dict or a full training checkpoint: take
    "teacher", strip "module." and "backbone." prefixes, drop the DINO projection head "head.*"."""
    if isinstance(obj, dict) and "teacher" in obj:
        obj = obj["teacher"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError("not a state dict of tensors")
    sd = {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in obj.items()}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


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
        raise ValueError(f"cannot read DINO weights {path} ({one_line(e)}); need the DINO ViT-B/16 "
                         f"{DINO_FILE} or a DINO training checkpoint (--dino-weights PATH)") from None
    _load_strict(model, sd, path, "DINO ViT-B/16", DINO_FILE)
    return model.to(device).eval().requires_grad_(False)


def _load_strict(model, sd, path, what, need):
    """model.load_state_dict(sd, strict=True), with one line that says how `sd` differs when it does not fit."""
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if len(missing) == len(expected):
        raise ValueError(f"{path} is not a {what} checkpoint: none of the {len(expected)} expected "
                         f"keys found (it has {len(sd)} keys such as {_names(sd)}); need {need}")
    if missing or unexpected:
        raise ValueError(f"weights {path} do not match {what}: {len(missing)} missing keys "
                         f"({_names(missing)}), {len(unexpected)} unexpected keys ({_names(unexpected)})")
    bad = [k for k in expected if sd[k].shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"weights {path}: {len(bad)} tensors have the wrong shape for {what}, e.g. {k} "
                         f"{tuple(sd[k].shape)} instead of {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)


# --- 5b. ImageNet backbones of torchvision beside DINO (paper Table IV), built by torchvision's own builders -----

def torchvision_names():
    """Builder names of torchvision's ImageNet classification models (resnet152, densenet201, vgg19, ...)."""
    from torchvision import models
    return models.list_models(module=models)


def _default_weights(name):
    from torchvision import models
    return models.get_model_weights(name).DEFAULT


def resolve_torchvision_weights(name, path=None, download=True):
    """Weights of torchvision's `name` → (path, how): --backbone-weights PATH, the torch hub cache (where
    torchvision's own download puts them), else that download, hash-checked like torchvision's."""
    url = _default_weights(name).url
    hash_prefix = torch.hub.HASH_REGEX.search(os.path.basename(url)).group(1)
    return _resolve_weights(name, url, path, "--backbone-weights", download,
                            f"--backbone-weights PATH (a state dict of torchvision's {name})", hash_prefix)


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier whose final linear layer is replaced by the identity: forward(x) is Φ, the
    pooled penultimate features that layer would classify. By family: resnet, the global average pool of
    the last stage (2048-d for resnet152, 512 for resnet18); densenet, ReLU + global average pool of the last
    dense block (1920 for densenet201); vgg, fc7 after its ReLU (4096); swin, the final LayerNorm + global
    average pool (1024 for swin_b); vit, the CLS token after the final LayerNorm (1024 for vit_l_16).
    `preprocess` is the weights' own ImageNet transform (resize, centre crop, mean/std) on the padded square."""

    def __init__(self, name, state_dict=None, path="state dict"):
        from torchvision import models
        super().__init__()
        self.name, self.weights = name, _default_weights(name)
        self.net = models.get_model(name, weights=None)
        head, linear = _head(name, self.net)
        if state_dict is not None:
            _load_strict(self.net, state_dict, path, f"torchvision's {name}", os.path.basename(self.weights.url))
        self.net.set_submodule(head, nn.Identity())
        self.embed_dim = linear.in_features
        self.transform = self.weights.transforms()

    def forward(self, x):
        return self.net(x)

    def preprocess(self, images, device="cpu"):
        """uint8 (b,H,W,3) RGB → the float (b,3,crop,crop) input torchvision's ImageNet transform makes."""
        x = to_device(torch.from_numpy(np.ascontiguousarray(images)), device).permute(0, 3, 1, 2)
        return self.transform(x)


def _head(name, net):
    """(name, module) of the classifier's final nn.Linear, the layer whose input is Φ."""
    linear = [(k, m) for k, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"torchvision's {name} has no final linear layer (its classifier is convolutional), so "
                         f"it has no pooled penultimate features to use as Φ; choose another --backbone")
    return linear[-1]


# torchvision's densenet checkpoints keep the old key names "norm.1", "conv.2", ...: renamed as its builder does
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                           r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def load_torchvision(name, path=None, device="cpu", download=True):
    """Resolve and load the weights of torchvision's `name` (strict=True, weights_only=True) into a
    TorchvisionBackbone in eval mode with requires_grad False."""
    path, _ = resolve_torchvision_weights(name, path, download)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError("not a state dict of tensors")
    except Exception as e:
        raise ValueError(f"cannot read {name} weights {path} ({one_line(e)}); need a state dict of "
                         f"torchvision's {name} (--backbone-weights PATH)") from None
    sd = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in sd.items()}
    return TorchvisionBackbone(name, sd, path).to(device).eval().requires_grad_(False)


def preprocessing(name):
    """What turns an image into the backbone's input, for cache keys: DINO's PREPROCESSING, or the
    torchvision weights' transform (resize, crop, interpolation, mean, std)."""
    return PREPROCESSING if name == "dino" else repr(_default_weights(name).transforms())


def load_backbone(name, path=None, device="cpu"):
    """The frozen feature extractor: "dino" (DINO ViT-B/16) or a torchvision builder name."""
    return load_dino(path, device) if name == "dino" else load_torchvision(name, path, device)


# --- 6. Feature extraction with an atomic .npy memmap cache; source standardisation ------------------------------

# x/255 then (x − mean)/std per channel as x·scale − shift, the constants in float32 as the kernels apply them
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).tolist()
_SHIFT = (torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).tolist()


def preprocess_images(images, device="cpu", size=IMAGE_SIZE):
    """uint8 (b,H,W,3) RGB → float32 (b,3,size,size): /255, bilinear antialiased resize, ImageNet
    mean/std (the ImageNet normalisation DINO was trained with).

    Fast path (2.5× on 64→224; test_preprocess_fast_path_equals_plain): x/255 then (x − mean)/std is
    one affine map per channel, and bilinear weights sum to 1, so it commutes with the resize and is
    applied to the small image. Antialiasing only changes a downscale (for an upscale the antialiased
    kernel IS the bilinear one, equal to 3e-15 in float64), so the plain, faster kernel upscales."""
    x = to_device(torch.from_numpy(np.ascontiguousarray(images)), device).permute(0, 3, 1, 2).contiguous().float()
    for c in range(3):  # per channel, with Python numbers: no constant has to be copied to the device
        x[:, c].mul_(_SCALE[c]).sub_(_SHIFT[c])
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def extract_features(model, images_fn, n, cache_path, batch_size=None, precision="fp32", device="cpu"):
    """Φ for images_fn(idx) → uint8 (b,H,W,3), idx = 0..n-1, as a read-only (n, D) float32 memmap of cache_path;
    the DINO ViT gets `preprocess_images`, a TorchvisionBackbone its own `preprocess`. Batches stream into a
    temporary .npy beside cache_path that becomes cache_path only when complete (atomic_write). batch_size
    None: 64 on a GPU, 8 on a CPU (larger batches are no faster there)."""
    D = model.embed_dim
    preprocess = getattr(model, "preprocess", preprocess_images)  # a TorchvisionBackbone brings its own
    batch_size = batch_size or (8 if torch.device(device).type == "cpu" else 64)
    if n < 1 or precision not in ("fp32", "bf16"):
        raise ValueError(f"cannot extract features of {n} images in precision {precision!r} (fp32 or bf16)")
    starts = range(0, n, batch_size)

    def batches():  # Φ of each batch, left on the device
        for start in starts:
            stop = min(start + batch_size, n)
            x = preprocess(_checked_images(images_fn(np.arange(start, stop)), stop - start), device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                phi = model(x).float()
            yield phi
    with atomic_write(cache_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, D))
        with torch.inference_mode():
            for start, batch in zip(starts, to_host(batches())):
                out[start:start + len(batch)] = batch
        out.flush()
        del out  # close the memmap before the rename
    return np.load(cache_path, mmap_mode="r")


def to_device(t, device):
    """A tensor on `device` without making the host wait: from the host to CUDA a pinned copy goes over
    asynchronously (a pageable one blocks the host until it is done); else `t.to(device)`."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host(tensors):
    """Each tensor of an iterable as a NumPy array on the host. From CUDA, each comes back in a non-blocking copy
    into pinned memory and is read one item later, once the next item's work is queued: the GPU never waits for
    the host, and the host waits only for a copy already done or under way."""
    pending = None
    for t in tensors:
        if t.device.type != "cuda":
            yield t.numpy()
            continue
        host, copied = t.to("cpu", non_blocking=True), torch.cuda.Event()  # a non-blocking copy back is pinned
        copied.record()
        if pending:
            pending[1].synchronize()
            yield pending[0].numpy()
        pending = host, copied
    if pending:
        pending[1].synchronize()
        yield pending[0].numpy()


def _checked_images(images, n):
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
            or images.shape[0] != n or images.shape[-1] != 3):
        raise ValueError(f"images_fn returned {getattr(images, 'dtype', type(images))} "
                         f"{getattr(images, 'shape', '')}, need uint8 ({n}, H, W, 3)")
    return images


def feature_stats(features, chunk=4096):
    """Per-dimension mean and std (population, floored at 1e-6) of source features, float32 (D,), summed in
    float64 a chunk of rows at a time, so a memmap is never loaded whole (vgg19's Φ of Texture-dSprites: 0.8 GB)."""
    s, ss = np.zeros(features.shape[1]), np.zeros(features.shape[1])
    for i in range(0, len(features), chunk):
        s += np.asarray(features[i:i + chunk], np.float64).sum(0)
    mean = s / len(features)
    for i in range(0, len(features), chunk):
        ss += ((np.asarray(features[i:i + chunk], np.float64) - mean) ** 2).sum(0)
    return mean.astype(np.float32), np.maximum(np.sqrt(ss / len(features)), 1e-6).astype(np.float32)


def standardise(features, mean, std):
    """(features - mean) / std with the *source* statistics (stored in checkpoints, applied unchanged
    to targets), float32."""
    return ((np.asarray(features, np.float32) - mean) / std).astype(np.float32)


def to_model(x):
    """Stored inputs -> model inputs: uint8 pixels become floats in [0, 1]; features pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


# --- 7. Files: every file the project writes goes through atomic_write; checkpoints rebuild their model ----------

@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; it replaces `path` only when the block completes, so a crash
    or Ctrl-C never leaves half a file (checkpoints, feature caches, splits, reports, figures)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(str(path))[1])
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_checkpoint(path, obj):
    """torch.save through atomic_write, every tensor moved to the CPU first (a checkpoint loads on any machine,
    and its bytes do not depend on the GPU it was trained on); saved from an open file, so the archive's inner
    name is always "archive" (not the random temporary name) and equal contents give equal bytes."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(_on_cpu(obj), f)


def _on_cpu(obj):
    """obj with every tensor off the CPU replaced by its CPU copy; containers keep their type and attributes
    (a state_dict is an OrderedDict with _metadata), so a checkpoint made on the CPU is saved unchanged."""
    if torch.is_tensor(obj):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _on_cpu(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def load_checkpoint(path):
    """Load a checkpoint written by `save_checkpoint` (tensors, numbers, strings, dicts only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, truncated files, foreign formats
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}; delete it to start afresh") from e


def model_config(model):
    """model.config plus the `kind` that build_model needs (se2.SE2VAE, a standalone module, has none)."""
    return dict(model.config, kind="se2") if type(model).__name__ == "SE2VAE" else dict(model.config)


def build_model(config):
    """Rebuild a model from its `config` dict (as stored in every checkpoint); se2.py is imported for an SE(2,N)
    model only, so this file can be copied without it."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "se2":
        import se2
        return se2.SE2VAE(**config)
    if kind not in ("feature", "conv"):
        raise ValueError(f"unknown model kind {kind!r} in checkpoint config")
    return (FeatureVAE if kind == "feature" else ConvVAE)(**config)


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
