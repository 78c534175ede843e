"""Tests of the ViT and its weights, feature extraction, the VAEs and their losses, checkpoints (drl.py)."""
import argparse
import math
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import drl


SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4)


# 224 input, 14×14 grid, tiny width: for extraction (always 224).
SMALL224 = dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2)


def small_model(config=SMALL_VIT, seed=0):
    torch.manual_seed(seed)
    return drl.VisionTransformer(**config).eval()


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No env var, an empty hub cache under a temporary TORCH_HOME."""
    monkeypatch.delenv("DRL_DINO_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def dino_table():
    """The state-dict table of DINO ViT-B/16 (facebookresearch/dino's vit_base)."""
    t = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
         "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
         "norm.weight": (768,), "norm.bias": (768,)}
    for i in range(12):
        b = f"blocks.{i}."
        t.update({b + "norm1.weight": (768,), b + "norm1.bias": (768,),
                  b + "attn.qkv.weight": (2304, 768), b + "attn.qkv.bias": (2304,),
                  b + "attn.proj.weight": (768, 768), b + "attn.proj.bias": (768,),
                  b + "norm2.weight": (768,), b + "norm2.bias": (768,),
                  b + "mlp.fc1.weight": (3072, 768), b + "mlp.fc1.bias": (3072,),
                  b + "mlp.fc2.weight": (768, 3072), b + "mlp.fc2.bias": (768,)})
    return t


def test_vit_base_state_dict_matches_dino_table():
    with torch.device("meta"):           # shapes only, nothing allocated or run
        sd = drl.vit_base().state_dict()
    table = dino_table()
    assert len(sd) == 150 and set(sd) == set(table)
    assert {k: tuple(v.shape) for k, v in sd.items()} == table
    assert sum(v.numel() for v in sd.values()) == 85_798_656
    m = drl.VisionTransformer(**SMALL_VIT)
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in m.blocks) and m.norm.eps == 1e-6
    assert m.blocks[0].mlp.act.approximate == "none"          # exact GELU


_TV_BLOCK_KEYS = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
                  "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
                  "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
_TV_KEYS = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj": "conv_proj",
            "norm": "encoder.ln"}


def to_torchvision(sd):
    """Our (DINO's) ViT keys -> torchvision.models.VisionTransformer's: both stack q, k, v row-wise with contiguous
    heads, so the tensors are the same."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            old = next(o for o in _TV_BLOCK_KEYS if rest == o or rest.startswith(o + "."))
            out[f"encoder.layers.encoder_layer_{i}." + _TV_BLOCK_KEYS[old] + rest[len(old):]] = v
        else:
            old = next(o for o in _TV_KEYS if k == o or k.startswith(o + "."))
            out[_TV_KEYS[old] + k[len(old):]] = v
    return out


def torchvision_reference(model):
    """torchvision's VisionTransformer with `model`'s config and weights, its head the identity: forward returns
    the final LayerNorm's token 0, the quantity model(x) returns."""
    c = model.config
    tv = torchvision.models.VisionTransformer(
        image_size=c["img_size"], patch_size=c["patch_size"], num_layers=c["depth"], num_heads=c["num_heads"],
        hidden_dim=c["embed_dim"], mlp_dim=int(c["embed_dim"] * c["mlp_ratio"]))
    tv.heads = nn.Identity()
    tv.load_state_dict(to_torchvision(model.state_dict()), strict=True)
    return tv.eval().requires_grad_(False)


def test_torchvision_key_mapping_full_size():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = to_torchvision(drl.vit_base().state_dict())
        tv = torchvision.models.vit_b_16().state_dict()
    tv = {k: tuple(v.shape) for k, v in tv.items() if not k.startswith("heads.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == tv


def test_matches_torchvision_small():
    pytest.importorskip("torchvision")
    m = small_model()
    tv = torchvision_reference(m)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, ref = m(x), tv(x)
    assert ours.shape == (3, 64)
    assert (ours - ref).abs().max().item() < 1e-5
    # the comparison can fail: perturbing one weight changes our output beyond the tolerance
    with torch.no_grad():
        m.blocks[1].mlp.fc2.bias[0] += 1e-2
    with torch.inference_mode():
        assert (m(x) - ref).abs().max().item() > 1e-4


def test_last_block_cls_only_equals_full_block():
    # forward runs the last block for the CLS token alone; that must be the full block's CLS row
    m = small_model()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        tokens = m.prepare_tokens(x)
        for blk in m.blocks[:-1]:
            tokens = blk(tokens)
        full = m.blocks[-1](tokens)
        cls = m.blocks[-1](tokens, cls_only=True)
        assert cls.shape == (3, 1, 64)
        assert (cls - full[:, :1]).abs().max().item() < 1e-6
        assert (m(x) - m.norm(full)[:, 0]).abs().max().item() < 1e-6
        # and the other tokens do matter: they are the keys and values of the CLS query
        tokens[:, 1:] += torch.randn(tokens[:, 1:].shape, generator=torch.Generator().manual_seed(4))
        assert (m.blocks[-1](tokens, cls_only=True) - cls).abs().max().item() > 1e-3


def write_random_checkpoint(path, wrap=lambda sd: sd, seed=0):
    """A random small ViT saved through `wrap`; returns (its output on a fixed input, that input)."""
    m = small_model(seed=seed)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        y = m(x)
    torch.save(wrap(m.state_dict()), path)
    return y, x


def test_load_routes_explicit_env_hub_cache(no_weights, monkeypatch):
    y, x = write_random_checkpoint(no_weights / "w.pth")
    routes = []
    p, how = drl.resolve_dino_weights(str(no_weights / "w.pth"), download=False)
    routes.append((p, how, drl.load_dino(p, download=False, config=SMALL_VIT)))
    monkeypatch.setenv("DRL_DINO_WEIGHTS", str(no_weights / "w.pth"))
    p, how = drl.resolve_dino_weights(download=False)
    routes.append((p, how, drl.load_dino(download=False, config=SMALL_VIT)))
    monkeypatch.delenv("DRL_DINO_WEIGHTS")
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", drl.DINO_FILE)
    assert cache == str(no_weights / "torch_home" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth")
    os.makedirs(os.path.dirname(cache))
    os.replace(no_weights / "w.pth", cache)
    p, how = drl.resolve_dino_weights(download=False)
    routes.append((p, how, drl.load_dino(download=False, config=SMALL_VIT)))
    assert [r[1] for r in routes] == ["explicit path", "env DRL_DINO_WEIGHTS", "torch hub cache"]
    for _, _, m in routes:
        assert not m.training and not any(q.requires_grad for q in m.parameters())
        with torch.inference_mode():
            assert torch.equal(m(x), y)


def full_checkpoint(sd):
    """The layout of DINO's *_full_checkpoint.pth: student under DDP, teacher bare, both with heads."""
    head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.ones(5, 1)}
    student = {"module.backbone." + k: v.clone() + 1 for k, v in sd.items()}
    student.update({"module." + k: v for k, v in head.items()})
    teacher = {"backbone." + k: v for k, v in sd.items()}
    teacher.update(head)
    return {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100, "args": argparse.Namespace(arch="vit_base", patch_size=16, lr=5e-4),
            "dino_loss": {"center": torch.zeros(1, 8)}}


@pytest.mark.parametrize("wrap", [
    full_checkpoint,
    lambda sd: {"teacher": {"module.backbone." + k: v for k, v in sd.items()}},
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {**{"backbone." + k: v for k, v in sd.items()}, "head.mlp.0.bias": torch.zeros(8)},
], ids=["full-checkpoint", "teacher-module-backbone", "module", "backbone-head"])
def test_checkpoint_variants(tmp_path, wrap):
    y, x = write_random_checkpoint(tmp_path / "w.pth", wrap)
    m = drl.load_dino(str(tmp_path / "w.pth"), download=False, config=SMALL_VIT)
    with torch.inference_mode():
        assert torch.equal(m(x), y)


def test_bad_weights_raise_valueerror_naming_the_problem(tmp_path):
    sd = small_model().state_dict()

    def load(obj, name):
        path = tmp_path / name
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            torch.save(obj, path)
        with pytest.raises(ValueError) as e:
            drl.load_dino(str(path), download=False, config=SMALL_VIT)
        msg = str(e.value)
        assert "\n" not in msg and name in msg
        return msg

    msg = load({k: v for k, v in sd.items() if k not in ("norm.bias", "blocks.1.attn.qkv.weight")}, "a.pth")
    assert "2 missing keys" in msg and "blocks.1.attn.qkv.weight" in msg and "norm.bias" in msg
    msg = load({**sd, "blocks.2.norm1.weight": torch.ones(64)}, "b.pth")
    assert "0 missing keys" in msg and "1 unexpected keys (blocks.2.norm1.weight)" in msg
    msg = load({**sd, "pos_embed": torch.zeros(1, 50, 64)}, "c.pth")
    assert "pos_embed (1, 50, 64) instead of (1, 17, 64)" in msg
    msg = load(b"this is not a checkpoint" * 10, "garbage.pth")
    assert "cannot read DINO weights" in msg
    msg = load({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, "resnet.pth")
    assert "not a DINO ViT-B/16 checkpoint" in msg and "conv1.weight" in msg
    msg = load(torch.zeros(3), "tensor.pth")
    assert "cannot read DINO weights" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth .explicit path. does not exist"):
        drl.load_dino(str(tmp_path / "nope.pth"), download=False)


def test_no_weights_anywhere(no_weights, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        drl.resolve_dino_weights(download=False)
    msg = str(e.value)
    assert "\n" not in msg and "--dino-weights PATH" in msg and "DRL_DINO_WEIGHTS" in msg
    assert os.path.join(torch.hub.get_dir(), "checkpoints", drl.DINO_FILE) in msg
    monkeypatch.setenv("DRL_DINO_WEIGHTS", str(no_weights / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth .env DRL_DINO_WEIGHTS. does not exist"):
        drl.load_dino(download=False)


def test_offline_download_failure_becomes_filenotfound(no_weights, monkeypatch):
    calls = []

    def offline(url, dst, *a, **k):                      # stands in for the network; nothing fetched
        calls.append((url, dst))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="download failed .*Temporary failure.*--dino-weights"):
        drl.load_dino()
    assert calls == [(drl.DINO_URL, os.path.join(torch.hub.get_dir(), "checkpoints", drl.DINO_FILE))]
    assert not os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", drl.DINO_FILE))


def test_download_lands_in_hub_cache(no_weights, monkeypatch):
    y, x = write_random_checkpoint(no_weights / "release.pth")

    def fake_download(url, dst, *a, **k):                # a "server" holding a small random release
        assert url == drl.DINO_URL
        with open(no_weights / "release.pth", "rb") as src, open(dst, "wb") as out:
            out.write(src.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert drl.resolve_dino_weights() == (os.path.join(torch.hub.get_dir(), "checkpoints", drl.DINO_FILE), "downloaded")
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)     # second time: from the cache
    m = drl.load_dino(config=SMALL_VIT)
    with torch.inference_mode():
        assert torch.equal(m(x), y)


def write_torchvision_checkpoint(path, name, seed=0, wrap=lambda sd: sd):
    """A random-weight torchvision `name` saved as a state dict; returns the model (eval mode)."""
    torch.manual_seed(seed)
    net = torchvision.models.get_model(name).eval()
    torch.save(wrap(net.state_dict()), path)
    return net


def test_phi_size_of_the_papers_backbones_per_family():
    want = {"resnet152": 2048, "densenet201": 1920, "vgg19": 4096, "swin_b": 1024, "vit_l_16": 1024}
    with torch.device("meta"):  # no weights, no memory
        assert {name: drl.TorchvisionBackbone(name).embed_dim for name in want} == want
        with pytest.raises(ValueError, match="squeezenet1_1 has no final linear layer"):
            drl.TorchvisionBackbone("squeezenet1_1")


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v3_small", "swin_t", "vit_b_16"])
def test_phi_is_the_input_of_the_final_linear_layer(tmp_path, name):
    """Loaded from a state dict the test writes, Φ fed to the model's own last layer gives its logits, and
    its size is the backbone's embed_dim."""
    net = write_torchvision_checkpoint(tmp_path / "w.pt", name)
    backbone = drl.load_torchvision(name, str(tmp_path / "w.pt"))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    x = backbone.preprocess(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.inference_mode():
        phi, logits = backbone(x), net(x)
        again = head(phi)
    assert phi.shape == (2, backbone.embed_dim) and backbone.embed_dim == head.in_features
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_torchvision_checkpoint_variants_and_preprocessing(tmp_path):
    """A {"state_dict": ...} wrapper and densenet's legacy key names ("norm.1") load to the same Φ; each
    backbone's preprocessing (a cache-key part) is its weights' own transform."""
    x = torch.rand(1, 3, 64, 64)
    outs = []
    for wrap in (lambda sd: sd, lambda sd: {"state_dict": sd},
                 lambda sd: {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in sd.items()}):
        write_torchvision_checkpoint(tmp_path / "w.pt", "densenet121", wrap=wrap)
        with torch.inference_mode():
            outs.append(drl.load_torchvision("densenet121", str(tmp_path / "w.pt"))(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    kinds = {str(drl.preprocessing(n)) for n in ("dino", "resnet18", "resnet152", "inception_v3")}
    assert len(kinds) == 4 and "resize_size=[232]" in drl.preprocessing("resnet152")


def test_torchvision_weights_resolution(no_weights, monkeypatch):
    """--backbone-weights, else the torch hub cache torchvision downloads into, else the download itself
    (hash-checked like torchvision's); offline → one line naming both ways out."""
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    calls = []

    def offline(*a, **k):
        calls.append((a, k))
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        drl.resolve_torchvision_weights("resnet18")
    assert "\n" not in str(e.value) and "--backbone-weights PATH" in str(e.value) and cached in str(e.value)
    assert calls[0][0][:2] == (url, cached) and calls[0][1]["hash_prefix"] == url.split("-")[-1][:-4]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        drl.resolve_torchvision_weights("resnet18", str(no_weights / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="no resnet18 weights found"):
        drl.resolve_torchvision_weights("resnet18", download=False)
    assert len(calls) == 1
    write_torchvision_checkpoint(no_weights / "w.pt", "resnet18")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    os.replace(no_weights / "w.pt", cached)
    assert drl.resolve_torchvision_weights("resnet18") == (cached, "torch hub cache")


def test_bad_torchvision_weights_raise_valueerror_naming_the_problem(tmp_path):
    write_torchvision_checkpoint(tmp_path / "r34.pt", "resnet34")
    with pytest.raises(ValueError) as e:                   # another architecture: missing and unexpected keys
        drl.load_torchvision("resnet18", str(tmp_path / "r34.pt"))
    assert "\n" not in str(e.value) and "r34.pt" in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read resnet18 weights .*junk.pt"):
        drl.load_torchvision("resnet18", str(tmp_path / "junk.pt"))


class CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.embed_dim, self.calls = model, model.embed_dim, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def image_source(n, size=64, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return images, (lambda idx: images[idx])


def test_preprocess_known_values():
    img = np.zeros((2, 64, 48, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0      # constant image: resize keeps it constant
    x = drl.preprocess_images(img)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    for c, v in enumerate((1.0, 0.2, 0.0)):
        want = (v - drl.IMAGENET_MEAN[c]) / drl.IMAGENET_STD[c]
        assert torch.allclose(x[:, c], torch.full_like(x[:, c], want), atol=1e-5)


@pytest.mark.parametrize("size", [64, 300])
def test_preprocess_resize_matches_pil_bilinear(size):
    Image = pytest.importorskip("PIL.Image")                # independent reference (antialiased)
    img = np.random.default_rng(size).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(img[0]).resize((224, 224), Image.BILINEAR), np.float32)
    x = drl.preprocess_images(img)[0].permute(1, 2, 0)
    back = (x * torch.tensor(drl.IMAGENET_STD) + torch.tensor(drl.IMAGENET_MEAN)).numpy() * 255
    assert np.abs(back - pil).max() < 1.5 and np.abs(back - pil).mean() < 0.6


def test_extract_features_writes_the_cache_it_returns(tmp_path):
    images, fn = image_source(10)
    model = CountingModel(small_model(SMALL224))
    path = str(tmp_path / "feats.npy")
    f = drl.extract_features(model, fn, 10, path, batch_size=4)
    assert isinstance(f, np.memmap) and f.shape == (10, 32) and f.dtype == np.float32
    assert model.calls == 3 and np.array_equal(np.load(path), f)
    with torch.inference_mode():
        direct = model.model(drl.preprocess_images(images)).numpy()
    np.testing.assert_allclose(f, direct, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["feats.npy"]   # no temporary files left


def test_interrupted_extraction_leaves_no_cache(tmp_path):
    images, fn = image_source(10)

    def failing(idx):
        if idx[0] >= 4:
            raise RuntimeError("disk on fire")
        return images[idx]

    path = tmp_path / "feats.npy"
    with pytest.raises(RuntimeError, match="disk on fire"):
        drl.extract_features(small_model(SMALL224), failing, 10, str(path), batch_size=4)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="need uint8"):
        drl.extract_features(small_model(SMALL224), lambda idx: images[idx].astype(np.float32), 10,
                             str(path), batch_size=4)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="precision 'fp16'"):
        drl.extract_features(small_model(SMALL224), fn, 10, str(path), precision="fp16")


def test_bf16_features_close_to_fp32(tmp_path):
    _, fn = image_source(8)
    m = small_model(SMALL224)
    f32 = np.asarray(drl.extract_features(m, fn, 8, str(tmp_path / "a.npy"), batch_size=8))
    f16 = np.asarray(drl.extract_features(m, fn, 8, str(tmp_path / "b.npy"), batch_size=8, precision="bf16"))
    assert not np.array_equal(f32, f16)                     # bf16 actually ran
    cos = (f32 * f16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(f16, axis=1)
    assert cos.min() >= 0.99


def test_feature_stats_and_standardise():
    rng = np.random.default_rng(0)
    f = (rng.normal(size=(1000, 4)) * [1, 2, 3, 0] + [5, -1, 0, 7]).astype(np.float32)
    mean, std = drl.feature_stats(f, chunk=300)
    np.testing.assert_allclose(mean, f.astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_allclose(std[:3], f[:, :3].astype(np.float64).std(0), rtol=1e-5)
    assert std[3] == np.float32(1e-6)                       # constant dimension floored
    z = drl.standardise(f, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :3].std(0), 1, atol=1e-4)


def test_kl_terms_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu1, lv1, mu2, lv2 = (torch.randn(5, 7, generator=g) for _ in range(4))
    n = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(n(mu1, (0.5 * lv1).exp()), n(mu2, (0.5 * lv2).exp()))
    assert torch.allclose(drl.kl_gaussians(mu1, lv1, mu2, lv2), ref, atol=1e-6)
    ref0 = torch.distributions.kl_divergence(n(mu1, (0.5 * lv1).exp()), n(torch.zeros(1), torch.ones(1)))
    assert torch.allclose(drl.kl_normal(mu1, lv1), ref0, atol=1e-6)


def test_ada_gvae_shares_low_divergence_dims_and_averages():
    # dims 0 and 2 move a lot between the two images, dims 1 and 3 barely: 1 and 3 are shared
    mu1 = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    mu2 = torch.tensor([[3.0, 0.1, -2.5, 0.0]])  # delta = 4.5, .005, 3.125, .153; tau = 2.25
    lv1 = torch.tensor([[0.0, 0.0, 0.0, math.log(2.0)]])
    lv2 = torch.zeros(1, 4)
    a_mu1, a_lv1, a_mu2, a_lv2, shared = drl.ada_gvae_aggregate(mu1, lv1, mu2, lv2)
    assert shared.tolist() == [[False, True, False, True]]
    # individual dims untouched
    assert a_mu1[0, 0] == 0.0 and a_mu2[0, 0] == 3.0 and a_mu2[0, 2] == -2.5
    # shared dims: mean of mu and arithmetic mean of the variances, identical in both posteriors
    assert torch.allclose(a_mu1[0, 1], torch.tensor(0.05)) and torch.equal(a_mu1[:, [1, 3]], a_mu2[:, [1, 3]])
    assert torch.allclose(a_lv1[0, 3].exp(), torch.tensor(1.5)) and torch.equal(a_lv1[:, [1, 3]], a_lv2[:, [1, 3]])


def test_ada_gvae_threshold_is_per_example_and_max_stays_individual():
    delta = torch.tensor([[0.0, 1.0, 2.0], [10.0, 0.0, 4.9]])
    shared = drl.ada_gvae_shared(delta)
    # example 0: tau = 1 -> only 0 is shared (1 is not < 1); example 1: tau = 5 -> dims 1 and 2 shared
    assert shared.tolist() == [[True, False, False], [False, True, True]]


def test_ada_gvae_tie_shares_every_dim():
    mu = torch.randn(3, 4)
    lv = torch.zeros(3, 4)
    *_, shared = drl.ada_gvae_aggregate(mu, lv, mu.clone(), lv.clone())
    assert shared.all()


def test_beta_warmup_is_linear_then_constant():
    assert drl.beta_warmup(0, 2.0, 100) == 0.0
    assert drl.beta_warmup(25, 2.0, 100) == pytest.approx(0.5)
    assert drl.beta_warmup(100, 2.0, 100) == 2.0
    assert drl.beta_warmup(5000, 2.0, 100) == 2.0
    assert drl.beta_warmup(0, 1.5, 0) == 1.5


def test_pair_loss_equals_hand_computed_terms():
    torch.manual_seed(0)
    model = drl.FeatureVAE(in_dim=6, hidden=4, latent_dim=3)
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    torch.manual_seed(1)
    out = model.pair_loss(x1, x2, beta=2.0)
    torch.manual_seed(1)
    mu, lv = model.encode(torch.cat([x1, x2]))
    m1, l1, m2, l2, _ = drl.ada_gvae_aggregate(mu[:4], lv[:4], mu[4:], lv[4:])
    z = drl.reparameterise(torch.cat([m1, m2]), torch.cat([l1, l2]))
    xh = model.decode(z)
    r1 = ((x1 - xh[:4]) ** 2).sum(1).mean()
    r2 = ((x2 - xh[4:]) ** 2).sum(1).mean()
    k1 = drl.kl_normal(m1, l1).sum(1).mean()
    k2 = drl.kl_normal(m2, l2).sum(1).mean()
    assert torch.allclose(out["loss"], 0.5 * (r1 + r2) + 2.0 * 0.5 * (k1 + k2), atol=1e-5)


def test_conv_vae_shapes_and_bernoulli_loss():
    model = drl.ConvVAE(latent_dim=10)
    x = torch.rand(3, 3, 64, 64)
    mu, lv = model.encode(x)
    assert mu.shape == (3, 10) and lv.shape == (3, 10)
    assert model.decode(mu).shape == (3, 3, 64, 64)
    out = model.loss(x, 1.0)
    # an untrained decoder gives logits near 0: BCE ~ ln 2 per pixel
    assert 0.5 * math.log(2) * 3 * 64 * 64 < out["recon"].item() < 2 * math.log(2) * 3 * 64 * 64
    with pytest.raises(ValueError, match="64x64"):
        drl.ConvVAE(size=32)


def test_checkpoint_roundtrip_and_garbage(tmp_path):
    model = drl.ConvVAE(latent_dim=5)
    drl.save_checkpoint(tmp_path / "m.pt", {"config": {"model": model.config}, "model": model.state_dict()})
    loaded, _ = drl.load_model(tmp_path / "m.pt")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded.representation(x), model.eval().representation(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        drl.load_checkpoint(tmp_path / "bad.pt")
    other = drl.ConvVAE(latent_dim=6)
    drl.save_checkpoint(tmp_path / "o.pt", {"config": {"model": model.config}, "model": other.state_dict()})
    with pytest.raises(ValueError, match="does not match"):
        drl.load_model(tmp_path / "o.pt")


def _plain_preprocess(images, size=224):
    """The textbook order: /255, antialiased bilinear resize, then ImageNet mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(drl.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(drl.IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("shape", [(64, 64), (300, 260), (224, 224), (40, 500)])
def test_preprocess_fast_path_equals_plain(shape):
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 256, (3, *shape, 3), dtype=np.uint8)
    fast, plain = drl.preprocess_images(images), _plain_preprocess(images)
    assert fast.shape == plain.shape == (3, 3, 224, 224)
    assert fast.dtype == torch.float32
    assert (fast - plain).abs().max().item() < 2e-5  # values span about [-2.2, 2.7]


def test_preprocess_downscale_is_antialiased():
    # a 1-pixel checkerboard shrunk 3× must average to grey; plain bilinear would alias to black/white
    board = ((np.indices((672, 672)).sum(0) % 2) * 255).astype(np.uint8)
    x = drl.preprocess_images(np.repeat(board[None, :, :, None], 3, axis=3))
    grey = (0.5 - np.array(drl.IMAGENET_MEAN)) / np.array(drl.IMAGENET_STD)
    assert np.allclose(x[0].mean(dim=(1, 2)).numpy(), grey, atol=1e-2)
    assert x.std().item() < 0.25  # without antialiasing: pure black and white, std ≈ 2.2
    aliased = F.interpolate(torch.from_numpy(board / 255.0)[None, None].float(), size=(224, 224), mode="bilinear")
    assert aliased.std().item() > 0.4


COPIED_ALONE = {  # module(s) copied into an empty folder -> a use of them there
    ("drl.py",): "import drl, torch; m = drl.FeatureVAE(8, 4, 2); drl.save_checkpoint('c.pt', {'config': {'model': "
                 "drl.model_config(m)}, 'model': m.state_dict()}); print(drl.load_model('c.pt')[0].encode(torch.zeros(1, 8))[0].shape)",
    ("se2.py",): "import se2, torch; print(se2.SE2VAE(n_iso=2, n_ori=1, width=(1, 1, 1)).representation(torch.rand(1, 3, 64, 64)).shape)",
    ("metrics.py",): "import metrics, numpy as np; z = np.random.default_rng(0).normal(size=(60, 3)); "
                     "print(metrics.mig(z, (z[:, :2] > 0).astype(int)))",
    ("data.py",): "import data; print(data.TextureDSprites().images([0, 1]).shape)",
    ("folders.py", "data.py"): "import folders; print(len(folders.load_target('synthetic-cells').test))",
}


def test_each_copyable_module_works_alone_in_an_empty_folder(tmp_path):
    """drl, se2, metrics and data (folders with data) import nothing else of the project, at import or in use:
    each is copied into an empty folder of its own and used there, all in parallel subprocesses."""
    import shutil
    import subprocess
    import sys
    here, runs = os.path.dirname(os.path.abspath(__file__)), {}
    for k, (files, code) in enumerate(COPIED_ALONE.items()):
        (tmp_path / str(k)).mkdir()
        for f in files:
            shutil.copy(os.path.join(here, f), tmp_path / str(k) / f)
        runs[files] = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path / str(k), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1"))
    for files, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and out.strip(), (files, err)
