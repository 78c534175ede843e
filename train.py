"""Train the source models (Ada-GVAE on Texture-dSprites) and finetune them on a target (β-VAE).

    python train.py --stage source   [--backbone auto|dino|pixels|resnet152|...] [--arch conv|se2] [--quick] ...
    python train.py --stage finetune --target synthetic-cells [--epochs 20] [--quick] ...
    torchrun --nproc-per-node=K train.py --stage source ...   # the seed x beta models split between K ranks

Everything goes under --out (default runs/): feature caches in features/, one folder per model with its
checkpoint.pt (weights, config, optimiser; written atomically, resumed automatically) and log.csv.

Read top to bottom: the Config (every setting, the paper's values as defaults), the names of a run's models,
the inputs (Φ or pixels of Texture-dSprites and of a target), the one training loop `fit`, and the pipeline that
evaluate.py calls (train_source, finetune). What is resolved at run time (backbone, weights, device) is
runtime.resolve's.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import drl
import folders
import runtime
from runtime import say


# ---------------------------------------------------------------------------------------------------------
# 1. Config: every setting of the protocol; the defaults are the paper's (Dapueto et al. 2025, Sec. III)
# ---------------------------------------------------------------------------------------------------------

def _opt(default, help, **argparse_kw):
    return field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclass(frozen=True)
class Config:
    # inputs
    backbone: str = _opt("auto", "dino: frozen DINO ViT-B/16 features; NAME: a torchvision ImageNet classifier "
                                 "(resnet152, densenet201, vgg19, swin_b, vit_l_16, ...); pixels: 64x64 RGB; "
                                 "auto: dino when its weights resolve, else pixels")
    arch: str = _opt("conv", "pixel VAE: conv or SE(2,N) (se2.py)", choices=["conv", "se2"])
    method: str = _opt("adagvae", "source-stage objective", choices=["adagvae", "betavae"])
    dino_weights: str = _opt(None, "DINO ViT-B/16 checkpoint (else $DRL_DINO_WEIGHTS, hub cache, download)")
    backbone_weights: str = _opt(None, "state dict of the torchvision backbone (else the torch hub cache, "
                                       "download); with --backbone dino the same as --dino-weights")
    textures: str = _opt(None, "folder with five grayscale texture images (default: procedural)")
    dsprites: str = _opt(None, "the real dsprites_ndarray_*.npz for the shape masks (default: procedural)")
    precision: str = _opt("auto", "feature extraction precision; auto: bf16 autocast on CUDA, fp32 on the CPU",
                          choices=["auto", "fp32", "bf16"])
    # protocol
    seeds: tuple = _opt(tuple(range(10)), "model seeds", type=int)
    betas: tuple = _opt((1.0, 2.0), "β values; every seed is trained with every β", type=float)
    steps: int = _opt(400_000, "source-stage steps; β warms up over the first 1/8 (50k of 400k)")
    epochs: int = _opt(20, "finetuning epochs on the target train split")
    batch_size: int = _opt(64, "pairs (source) or images (finetune) per step")
    lr: float = _opt(1e-4, "learning rate (Adam on the source, AdamW on the target)")
    latent_dim: int = _opt(10, "latent dims (z_ISO dims for --arch se2)")
    n_train: int = _opt(10_000, "DCI/MIG training samples of Texture-dSprites")
    n_test: int = _opt(5_000, "DCI test samples")
    # target
    target: str = _opt(None, "target dataset: " + ", ".join(folders.TARGETS))
    data_root: str = _opt(None, "the unpacked download, or a folder holding <target>/ (default $DRL_DATA or ./data)")
    holdout_class: str = _opt(None, "leave this class out of finetuning and classifiers (open set); the class or an "
                                    "unambiguous prefix of it (arcella)")
    split_by_slide: bool = _opt(False, "sipakmed: split 80/20 grouped by slide, so no slide has crops on both sides "
                                       "(the paper splits the crops)")
    max_bad_images: float = _opt(folders.BAD_IMAGE_TOLERANCE, "undecodable target images to skip: a count (>= 1) "
                                 "or a fraction (< 1) of all images; more stops the run before training")
    # run
    out: str = _opt("runs", "run folder")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...; under torchrun each rank "
                               "takes cuda:$LOCAL_RANK")
    no_tf32: bool = _opt(False, "on CUDA, keep fp32 matmuls and convolutions in full fp32 (default: TF32)")
    compile: bool = _opt(False, "run the VAE step through torch.compile (equal to eager within 1e-4 after 100 "
                                "steps, tested)")
    parallel_models: bool = _opt(False, "train all seeds x betas at once, weights stacked with torch.func "
                                        "(feature and conv VAEs; each equals its own run to ~1e-5)")
    quick: bool = _opt(False, "the same pipeline at a size a 2-core CPU finishes in minutes (QUICK)")

    def __post_init__(self):
        for k in ("steps", "epochs", "batch_size", "latent_dim", "n_train", "n_test"):
            if getattr(self, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(self, k)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not self.seeds or not self.betas:
            raise ValueError("--seeds and --betas need at least one value each")
        if self.backbone not in ("auto", "dino", "pixels") and self.backbone not in drl.torchvision_names():
            raise ValueError(f"--backbone {self.backbone} is not auto, dino, pixels or a torchvision classification "
                             f"model (e.g. resnet152, densenet201, vgg19, swin_b, vit_l_16, resnet18)")

    @property
    def warmup_steps(self):
        """The paper's 50k warm-up steps of 400k, the same fraction for shorter runs."""
        return round(self.steps * 50_000 / 400_000)


QUICK = dict(seeds=(0, 1), betas=(1.0,), steps=500, epochs=5, n_train=2000, n_test=1000)


def add_config_args(parser, several=()):
    """One --flag per Config field, its help from the field; defaults stay None so that the preset
    (paper or --quick) can fill what the command line leaves out. Fields in `several` take a list. Plus
    --check-data, which both scripts take."""
    for f in dataclasses.fields(Config):
        meta, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
        if f.name in several:
            meta["nargs"] = "+"
        preset = f" (default {f.default!r}" + (f", quick {QUICK[f.name]!r})" if f.name in QUICK else ")")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=meta.pop("help"))
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", help=meta.pop("help") + preset, **meta)
        else:
            kind = type(f.default) if f.default is not None else str
            parser.add_argument(flag, type=kind, help=meta.pop("help") + preset, **meta)
    parser.add_argument("--check-data", action="store_true", help="read and check --target as a run would, print "
                        "what was found (layout, classes, images per split, masks, what was skipped) and exit")


def config_from_args(args):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return Config(**{**(QUICK if given.get("quick") else {}), **given})


# ---------------------------------------------------------------------------------------------------------
# 2. Names of a run's models: `res` is the runtime.Resolved of the run (the backbone "auto" became, its
#    weights file, the device), decided once by runtime.resolve(cfg) and never written into the Config
# ---------------------------------------------------------------------------------------------------------

def vae_arch(cfg, res):
    """The VAE that a run trains: an MLP on features Φ, else --arch (conv or se2) on pixels."""
    return "mlp" if res.backbone != "pixels" else cfg.arch


def model_tag(cfg, res):
    return f"{res.backbone}-{vae_arch(cfg, res)}-{cfg.method}-z{cfg.latent_dim}-{cfg.steps}steps"


def source_folder(cfg, res, beta, seed):
    return os.path.join(cfg.out, "source", model_tag(cfg, res), f"beta{beta:g}-seed{seed}")


def finetune_folder(cfg, res, beta, seed):
    target = cfg.target + (f"-without-{cfg.holdout_class}" if cfg.holdout_class else "")
    return os.path.join(cfg.out, "finetune", target, model_tag(cfg, res) + f"-{cfg.epochs}ep",
                        f"beta{beta:g}-seed{seed}")


def missing_models(cfg, res):
    """The checkpoints of the run (each seed × β model's source and finetuned one) not fully trained yet."""
    paths = [os.path.join(folder(cfg, res, b, s), "checkpoint.pt") for b in cfg.betas for s in cfg.seeds
             for folder in (source_folder, finetune_folder)]
    return [p for p in paths if not is_done(p)]


def new_model(cfg, res):
    if res.backbone != "pixels":
        return drl.FeatureVAE(in_dim=res.feature_dim, latent_dim=cfg.latent_dim)
    if cfg.arch == "se2":
        import se2
        return se2.SE2VAE(n_iso=cfg.latent_dim)
    return drl.ConvVAE(latent_dim=cfg.latent_dim)


# ---------------------------------------------------------------------------------------------------------
# 3. Inputs: Φ (cached) or 64×64 pixels of Texture-dSprites and of a target
# ---------------------------------------------------------------------------------------------------------

def features(cfg, res, name, digest, n, images_fn):
    """Φ of n images through the frozen backbone, cached under out/features/ by everything that changes it."""
    key = runtime.cache_key(dataset=digest, backbone=res.backbone, weights=res.weights_digest,
                        precision=res.precision, preprocessing=drl.preprocessing(res.backbone))
    path = os.path.join(cfg.out, "features", f"{name}-{key}.npy")
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    say(f"features: extracting {res.backbone} features of {n} {name} images -> {path}")
    backbone = drl.load_backbone(res.backbone, res.weights, device=res.device)
    t0 = last = time.time()

    def progress(done, total):  # a line every 10 s and at the end
        nonlocal last
        if done == total or time.time() - last >= 10:
            last = time.time()
            say(f"  features {done}/{total} ({done / max(last - t0, 1e-9):.1f} img/s)")
    with runtime.exact_fp32(res.device):
        return drl.extract_features(backbone, images_fn, n, path, precision=res.precision, device=res.device,
                                    progress=progress)


class SourceInputs:
    """The model input of every Texture-dSprites image as one tensor on the device, addressed by factors.

    pixels: uint8 images (N, 3, 64, 64), scaled to [0, 1] per batch; else standardised Φ (N, D).
    Exposes `factor_sizes` and `render(factors)` so metrics.disentanglement_scores can use it directly.
    """

    def __init__(self, cfg, res):
        self.dataset = data.TextureDSprites(textures=cfg.textures, dsprites=cfg.dsprites)
        self.factor_sizes, self.factor_names = self.dataset.factor_sizes, self.dataset.factor_names
        n = len(self.dataset)
        if res.backbone == "pixels":
            images = self.dataset.images(np.arange(n))
            self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(res.device)
            self.stats = None
        else:
            phi = features(cfg, res, "texture-dsprites", self.dataset.digest, n, self.dataset.images)
            mean, std = drl.feature_stats(phi)
            self.stats = {"feature_mean": torch.as_tensor(mean), "feature_std": torch.as_tensor(std)}
            self.x = torch.as_tensor(drl.standardise(phi, mean, std), dtype=torch.float32).to(res.device)

    def render(self, factors):
        idx = torch.as_tensor(self.dataset.factors_to_index(np.asarray(factors)), device=self.x.device)
        return drl.to_model(self.x[idx])

    def batches(self, batch_size, paired):
        """batch_fn(seed, step) for fit: the indices into self.x of pairs that differ in one factor (Ada-GVAE),
        (2, batch_size), or of single images (batch_size,); drawn on the host, a pure function of (seed, step)."""
        to_index = self.dataset.factors_to_index

        def batch_fn(seed, step):
            rng = np.random.default_rng(step_seed(seed, step))
            if paired:
                f1, f2, _ = data.sample_pairs(self.factor_sizes, batch_size, rng)
                return np.stack([to_index(f1), to_index(f2)])
            return to_index(data.sample_factors(self.factor_sizes, batch_size, rng))
        return batch_fn


def target_inputs(cfg, res, images, stats, name):
    """The model input for an ImageSet: uint8 64×64 pixels or standardised Φ (source statistics)."""
    if res.backbone != "pixels":
        phi = features(cfg, res, name, images.digest, len(images), lambda idx: images.images(idx, 224))
        return torch.as_tensor(drl.standardise(phi, stats["feature_mean"].numpy(), stats["feature_std"].numpy()),
                               dtype=torch.float32)
    return torch.from_numpy(images.images(np.arange(len(images)), 64)).permute(0, 3, 1, 2).contiguous()


def epoch_batches(n, batch_size):
    """batch_fn(seed, step) for finetuning on n images: shuffled epochs, step t takes its slice of the
    permutation of epoch t // steps_per_epoch (a pure function of (seed, step), so a resumed run sees the same
    batches). Returns indices (batch_size,) into the images."""
    steps_per_epoch = math.ceil(n / batch_size)

    def batch_fn(seed, step):
        epoch, i = divmod(step, steps_per_epoch)
        return np.random.default_rng((seed, epoch)).permutation(n)[i * batch_size:(i + 1) * batch_size]
    return batch_fn


# ---------------------------------------------------------------------------------------------------------
# 4. The training loop: fit resumes each run and trains it, or a Stack of runs (--parallel-models), through
#    train_step: batch -> model(batch, beta) -> backward -> per-model clipping -> Adam. A Stack looks like one
#    model to that step (stacked weights, the objective under torch.vmap). Every random draw is a pure
#    function of (seed, step): a resumed run equals an uninterrupted one.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One model to train and where it goes."""
    model: torch.nn.Module
    seed: int
    beta: float
    folder: str
    config: dict                                 # every setting that defines the run (checked on resume)
    extra: dict = field(default_factory=dict)    # stored in the checkpoint too (feature statistics)
    start: int = 0                               # the step its checkpoint reached
    optimizer_state: dict = None


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient: the run stops and its last good checkpoint is kept."""


def step_seed(seed, step):
    """The seed of step `step` of run `seed`: every draw of a step depends on (seed, step) alone."""
    return (int(seed) * 1_000_003 + int(step)) % (2 ** 63)


def make_optimizer(params, optimizer="adam", *, lr=1e-4, weight_decay=0.0):
    """Adam (Kingma & Ba 2015) or AdamW (Loshchilov & Hutter 2019), PyTorch's fused kernel where there is one."""
    if optimizer not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r} (adam or adamw)")
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    return (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(
        params, lr=lr, weight_decay=weight_decay, fused=fused)


def _ckpt_path(run):
    return os.path.join(run.folder, "checkpoint.pt")


def _saved_config(run, steps):
    """The configuration a run's checkpoint records: the run's settings, its architecture and its steps."""
    return dict(run.config, model=drl.model_config(run.model), steps=steps)


def _resume(run, steps):
    """Load the run's checkpoint, if any, into its model; another configuration is refused."""
    if os.path.exists(_ckpt_path(run)):
        ckpt = drl.load_checkpoint(_ckpt_path(run))
        runtime.check_config(_ckpt_path(run), ckpt["config"], _saved_config(run, steps))
        run.model.load_state_dict(ckpt["model"])
        run.start, run.optimizer_state = ckpt["step"], ckpt["optimizer"]


def train_step(model, opt, batch, beta, noise, grad_clip):
    """One optimiser step, the same for one model and for a Stack of them: the loss of model(batch, beta) (a
    β-VAE on images, the Ada-GVAE on pairs), backward, each model's gradients clipped to norm grad_clip, Adam.
    Returns each model's loss, reconstruction, KL and gradient norm, (M, 4), left on the device."""
    out = model(batch, beta) if noise is None else model(batch, beta, noise)
    opt.zero_grad(set_to_none=True)
    out["loss"].sum().backward()
    norms = clip_per_model(model, grad_clip).reshape(out["loss"].shape)
    opt.step()
    return torch.stack([out["loss"], out["recon"], out["kl"], norms], dim=-1).reshape(-1, 4).detach()


def fit(runs, x, batch_fn, *, steps, lr=1e-4, optimizer="adam", weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
        device="cpu", stack=False, compile=False, log_every=50, checkpoint_every_s=120.0, progress=None):
    """Train every run to `steps` optimiser steps, resuming each from `folder/checkpoint.pt`.

    x holds every input of the dataset on `device` (uint8 pixels, scaled to [0, 1] per batch, or float
    features). batch_fn(seed, step) returns int64 indices into x, drawn on the host as a pure function of its
    arguments: (B,) single images (β-VAE) or (2, B) pairs (Ada-GVAE). The indices of all models of a step
    reach the device in one non-blocking copy, and nothing is read back from the device between log steps.
    stack=False trains the runs one after another; stack=True all at once (runs at different steps are
    grouped by step). compile=True runs the objective (forward and backward) through torch.compile. Writes
    folder/checkpoint.pt (CPU tensors) and folder/log.csv per run; progress(dict) is called about every 5 s.
    A non-finite loss raises TrainingDiverged. Returns the final checkpoints, in order.
    """
    for r in runs:
        _resume(r, steps)
    todo = [r for r in runs if r.start < steps]
    groups = ([[r for r in todo if r.start == s] for s in sorted({r.start for r in todo})] if stack
              else [[r] for r in todo])
    for group in groups:  # runs at the same step: one model, or a Stack of M
        M, start = len(group), group[0].start
        model, opt, stacked = _model_and_optimizer(group, device, compile, optimizer, lr, weight_decay)
        logs = [runtime.CsvLog(r.folder, start) for r in group]
        stats, n_stats, rate = torch.zeros(M, 4, dtype=torch.float64, device=device), 0, runtime.RecentRate(start)
        betas = torch.tensor([r.beta for r in group], device=device)  # built once; each step scales it on the device
        t0 = last_ckpt = last_progress = time.time()
        for step in range(start, steps):
            batch, noise = _next_batch(group, x, batch_fn, step, group[0].model.config.get("latent_dim"), stacked)
            ramp = drl.beta_warmup(step, 1.0, warmup_steps)  # a Python float: β·ramp needs no host-to-device copy
            with runtime.compiling(compile and step == start):
                stats += train_step(model, opt, batch, betas * ramp if stacked else group[0].beta * ramp, noise,
                                    grad_clip).double()  # (M, 4) running sums stay on the device until a log step
            n_stats += 1
            done = step + 1
            if done % log_every and done != steps:
                continue
            means = (stats / n_stats).cpu()
            _check_finite(means, done, group)
            beta = [r.beta * ramp for r in group]
            for log, row, b in zip(logs, means.tolist(), beta):
                log.write(done, row[:3], b, time.time() - t0)
            stats.zero_()
            n_stats = 0
            now = time.time()
            if progress and (now - last_progress >= 5.0 or done == steps):
                r_now = rate(done)
                progress({"step": done, "steps": steps, "loss": float(means[:, 0].mean()), "beta": sum(beta) / M,
                          "models": M, "steps_per_s": r_now, "eta_s": (steps - done) / max(r_now, 1e-9)})
                last_progress = now
            if now - last_ckpt >= checkpoint_every_s or done == steps:
                _write_checkpoints(group, model, opt, done, steps, means)
                last_ckpt = now
        for log in logs:
            log.close()
    return [drl.load_checkpoint(_ckpt_path(r)) for r in runs]


def _model_and_optimizer(group, device, compile, optimizer, lr, weight_decay):
    """(model, optimiser, stacked) for the runs of a group, the optimiser's state resumed: the run's own model, or
    a Stack of the M models (compiled, even one model is a Stack: ε and β come in as tensors)."""
    for r in group:
        r.model.to(device).train()
    stacked = len(group) > 1 or compile
    model, models = group[0].model, [r.model for r in group]
    if stacked:
        _check_stackable(models, "--compile" if compile else "--parallel-models")
        model = Stack(models, _compiled(models[0], len(group)) if compile else _vmapped(models[0]))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr=lr,
                         weight_decay=weight_decay)
    if group[0].start > 0:
        opt.load_state_dict(_stack_optimizer_states([r.optimizer_state for r in group]) if stacked
                            else group[0].optimizer_state)
    return model, opt, stacked


class Stack(torch.nn.Module):
    """M models of one architecture as one model, for --parallel-models: every trainable weight becomes one
    tensor with a leading model dim (torch.func.stack_module_state), and forward(batch, beta (M,), noise) runs
    the models' own objective through torch.vmap, returning (M,) losses. Adam is elementwise, so one Adam over
    the stacked tensors is each model's own Adam. `objective` is _vmapped(models[0]) or its torch.compile
    (_compiled): the first model lends its structure only (not registered)."""

    def __init__(self, models, objective):
        super().__init__()
        trainable = [k for k, p in models[0].named_parameters() if p.requires_grad]
        weights = torch.func.stack_module_state(models)[0]
        self.names = [k for k in weights if k in trainable]
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(weights[k].detach()) for k in self.names])
        self.objective = objective

    def forward(self, batch, beta, noise):
        return self.objective(dict(zip(self.names, self.weights)), batch, beta, noise)

    def unstack(self, models):
        """Copy model m's slice of every stacked weight into models[m]."""
        with torch.no_grad():
            for m, model in enumerate(models):
                own = dict(model.named_parameters())
                for k, w in zip(self.names, self.weights):
                    own[k].copy_(w[m])


def clip_per_model(model, max_norm):
    """torch.nn.utils.clip_grad_norm_, model by model: the norm of model m's gradients over all its tensors,
    scaled by max_norm / (norm + 1e-6) where that is below 1 (0 or None: no clipping). A single model is a
    stack of one (its gradients viewed with a model dim of 1). Returns the (M,) norms."""
    grads = [p.grad if isinstance(model, Stack) else p.grad.unsqueeze(0) for p in model.parameters()
             if p.grad is not None]
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], 1),
                                     dim=1)
    if max_norm:
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
    return norms


def _check_stackable(models, flag):
    first = models[0]
    if any(True for _ in first.buffers()):
        raise ValueError(f"{type(first).__name__} keeps buffers (BatchNorm running statistics) per model, which "
                         f"the torch.vmap step cannot hold; drop {flag}")
    for m in models:
        if drl.model_config(m) != drl.model_config(first):
            raise ValueError(f"--parallel-models needs models of one architecture, got {drl.model_config(first)} "
                             f"and {drl.model_config(m)}")


def _vmapped(template):
    """(stacked weights, batch, beta (M,), noise (M, ...)) -> dict of (M,) losses: template(batch, beta, noise)
    with each model's weights, through torch.vmap."""
    return torch.vmap(lambda w, b, beta, noise: torch.func.functional_call(template, w, (b, beta, noise)))


# The one cache kept as module state: torch.compile'd objectives, one per architecture and stack size, so that
# the source and the finetuning stage of a run (and bench.py's warm-up and timing) share the kernels.
_COMPILED = {}


def _compiled(template, n_models):
    """torch.compile of the vmapped objective, one per architecture and stack size, with static shapes (a
    second stack size would otherwise recompile the first one's graph with dynamic shapes): the template lends
    only its structure (every weight comes in through params), so the models of a sweep share one set of
    kernels."""
    key = (json.dumps(drl.model_config(template), sort_keys=True), n_models)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_vmapped(template), dynamic=False)
    return _COMPILED[key]


def _next_batch(group, x, batch_fn, step, latent_dim, stacked):
    """The batch of every run of the group and, for the vmap step, its reparameterisation noise ε.

    Each seed's indices and ε are drawn right after seeding the torch RNG with (seed, step) — where a model
    alone draws ε inside — so a stacked model equals its run alone; runs with the same seed (β = 1 and β = 2)
    share them. The indices of all runs go to the device in one non-blocking copy (to_device) and select
    their rows of x there. Returns the batch (x or (x1, x2); a leading model dim when stacked) and ε."""
    drawn, noise = {}, {}
    for r in group:
        if r.seed not in drawn:
            seed_torch(step_seed(r.seed, step), x.device)
            drawn[r.seed] = batch_fn(r.seed, step)
            if stacked:
                rows = drawn[r.seed].size  # 2B rows for pairs, B for single images
                noise[r.seed] = torch.randn(rows, latent_dim, device=x.device)
    seeds = [r.seed for r in group] if stacked else [group[0].seed]
    idx = to_device(torch.from_numpy(np.stack([drawn[s] for s in seeds])), x.device)  # (M, [2,] B)
    batch = drl.to_model(x[idx])
    if not stacked:
        batch = batch[0]
    if idx.dim() == 3:  # pairs: (M, 2, B, ...) -> x1, x2
        batch = (batch[:, 0], batch[:, 1]) if stacked else (batch[0], batch[1])
    return batch, torch.stack([noise[s] for s in seeds]) if stacked else None


def seed_torch(seed, device):
    """torch.manual_seed(seed) for the generators a step draws from: the CPU's and, on CUDA, the one of
    `device` (torch.manual_seed seeds every backend, at 75 µs a call on this CPU; this takes 1 µs)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def to_device(t, device):
    """A host tensor on `device` without waiting for it: on CUDA a pinned copy goes over asynchronously
    (a pageable one makes the host wait for the copy); elsewhere the tensor itself."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_finite(means, step, group):
    bad = (~torch.isfinite(means)).any(dim=1).nonzero()
    if len(bad):
        m, r = int(bad[0]), group[int(bad[0])]
        what = "loss" if not torch.isfinite(means[m, 0]) else "gradient norm"
        raise TrainingDiverged(f"{what} became {means[m].tolist()[0 if what == 'loss' else 3]} by step {step} "
                               f"(seed {r.seed}, beta {r.beta}); the last good checkpoint is kept in {r.folder}; "
                               f"lower --lr or check the input data")


def _stack_optimizer_states(states):
    """Per-model optimiser state_dicts -> the state_dict of one optimiser over the stacked tensors."""
    first = states[0]
    return {"param_groups": first["param_groups"],
            "state": {i: {k: v if k == "step" else torch.stack([s["state"][i][k] for s in states])
                          for k, v in st.items()} for i, st in first["state"].items()}}


def _model_optimizer_state(state, m):
    """Model m's slice of a stacked optimiser's state_dict (m None: one model's, as it is): what an optimiser of
    that model alone holds."""
    return {"param_groups": state["param_groups"],
            "state": {i: {k: v if k == "step" or m is None else v[m].clone() for k, v in st.items()}
                      for i, st in state["state"].items()}}


def _write_checkpoints(group, model, opt, step, steps, means):
    """Each run's checkpoint (atomically): its weights (a Stack's slice copied into its module first) and what
    an optimiser of that model alone holds."""
    stacked, state = isinstance(model, Stack), opt.state_dict()
    if stacked:
        model.unstack([r.model for r in group])
    for m, r in enumerate(group):
        drl.save_checkpoint(_ckpt_path(r), {
            "config": _saved_config(r, steps), "model": r.model.state_dict(),
            "optimizer": _model_optimizer_state(state, m if stacked else None),
            "step": step, "done": step >= steps, "loss": float(means[m, 0]), **r.extra})
        runtime.PROCESS["written"][_ckpt_path(r)] = step


# ---------------------------------------------------------------------------------------------------------
# 5. The pipeline evaluate.py calls: train the source models, finetune them on a target
# ---------------------------------------------------------------------------------------------------------

def is_done(path):
    """Is the model at `path` fully trained?"""
    return os.path.exists(path) and drl.load_checkpoint(path).get("done", False)


def trained_already(path, settings, cfg):
    """Is the model at `path` fully trained (False when there is none)? One made from other data or flags than
    `settings` (what the run records) is an error that says in words what differs: never silently reused, never
    overwritten. The checkpoint is read once."""
    if not os.path.exists(path):
        return False
    ckpt = drl.load_checkpoint(path)
    saved = {k: v for k, v in ckpt["config"].items() if k not in ("model", "steps")}
    runtime.check_config(path, saved, settings, lambda k, there, now: runtime.explain_difference(cfg, k, there, now))
    return ckpt.get("done", False)


def _fit_and_report(runs, x, batch_fn, label, cfg, res, steps, **kw):
    """fit() the runs (stacked with --parallel-models), then one summary line per model."""
    t0 = time.time()
    done = fit(runs, x, batch_fn, steps=steps, device=res.device, stack=cfg.parallel_models, compile=cfg.compile,
               progress=runtime.printer(label), **kw)
    for r, ckpt in zip(runs, done):
        say(f"[{label}] beta={r.beta:g} seed={r.seed}: {ckpt['step']} steps, final loss {ckpt['loss']:.2f} "
            f"-> {r.folder}")
    say(f"[{label}] {len(runs)} model(s) trained in {time.time() - t0:.0f} s")


def my_models(cfg, res):
    """The (β, seed) models of this process: all of them, or under torchrun every world-th from its rank."""
    models = [(beta, seed) for beta in cfg.betas for seed in cfg.seeds]
    mine = models[res.rank::res.world]
    if not mine:
        say(f"no model for this rank ({len(models)} model(s), {res.world} ranks): waiting for the others")
    return mine


def train_source(cfg, res):
    """Train every seed × β source model of this rank that is not finished yet; returns their checkpoint
    paths."""
    digest = data.TextureDSprites(textures=cfg.textures, dsprites=cfg.dsprites).digest
    runs, paths = [], []
    for beta, seed in my_models(cfg, res):
        config = {"stage": "source", "backbone": res.backbone, "arch": cfg.arch, "method": cfg.method,
                  "backbone_weights": res.weights_digest,
                  "precision": res.precision if res.weights else None,
                  "latent_dim": cfg.latent_dim, "dataset": digest, "seed": seed, "beta": beta,
                  "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size, "lr": cfg.lr}
        folder = source_folder(cfg, res, beta, seed)
        paths.append(os.path.join(folder, "checkpoint.pt"))
        if not trained_already(paths[-1], config, cfg):
            torch.manual_seed(seed)
            runs.append(Run(new_model(cfg, res), seed, beta, folder, config))
    if not runs:
        if paths:
            say(f"source {model_tag(cfg, res)}: all {len(paths)} model(s) trained already, nothing to train")
        return paths
    src = SourceInputs(cfg, res)
    say(f"source {model_tag(cfg, res)}: training {len(runs)} model(s), {cfg.steps} steps"
        + (" each, stacked (--parallel-models)" if cfg.parallel_models else " each"))
    for r in runs:
        r.extra = src.stats or {}
    _fit_and_report(runs, src.x, src.batches(cfg.batch_size, cfg.method == "adagvae"), f"source {model_tag(cfg, res)}",
                    cfg, res, cfg.steps, lr=cfg.lr, optimizer="adam", warmup_steps=cfg.warmup_steps)
    return paths


def train_split(cfg, target):
    """The finetuning images: the train split, minus the held-out class if any."""
    if not cfg.holdout_class:
        return target.train
    return target.train.subset(np.flatnonzero(target.train.labels != target.classes.index(cfg.holdout_class)))


def finetune(cfg, res, target):
    """Finetune every source model on the target train split (β-VAE, whole model, AdamW, constant β);
    returns the (source, finetuned) checkpoint path pairs."""
    pairs, runs = [], []
    for path in train_source(cfg, res):
        ckpt = drl.load_checkpoint(path)
        beta, seed = ckpt["config"]["beta"], ckpt["config"]["seed"]
        folder = finetune_folder(cfg, res, beta, seed)
        pairs.append((path, os.path.join(folder, "checkpoint.pt")))
        config = {"stage": "finetune", "source": ckpt["config"], "target": target.digest,
                  "holdout": cfg.holdout_class, "seed": seed, "beta": beta, "epochs": cfg.epochs,
                  "batch_size": cfg.batch_size, "lr": cfg.lr}
        if not trained_already(pairs[-1][1], config, cfg):
            stats = {k: ckpt[k] for k in ("feature_mean", "feature_std") if k in ckpt}
            runs.append(Run(drl.load_model(path)[0], seed, beta, folder, config, stats))
    if not runs:
        if pairs:
            say(f"finetune {cfg.target}: all {len(pairs)} model(s) finetuned already, nothing to train")
        return pairs
    x = target_inputs(cfg, res, train_split(cfg, target), runs[0].extra, f"{cfg.target}-train").to(res.device)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    say(f"finetune {cfg.target}: {len(runs)} model(s), {cfg.epochs} epochs of {len(x)} images ({steps} steps)")
    _fit_and_report(runs, x, epoch_batches(len(x), cfg.batch_size), f"finetune {cfg.target}", cfg, res, steps,
                    lr=cfg.lr, optimizer="adamw", weight_decay=0.01)
    return pairs


# ---------------------------------------------------------------------------------------------------------
# 6. The script
# ---------------------------------------------------------------------------------------------------------


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["source", "finetune"])
    add_config_args(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.check_data:
        return runtime.check_data(cfg)
    if not args.stage:
        raise ValueError("--stage source or --stage finetune is required (or --check-data)")
    runtime.check_writable(cfg.out)
    t0 = time.time()
    res = runtime.resolve(cfg, say)
    runtime.setup_process(cfg, res)
    if args.stage == "source":
        paths = train_source(cfg, res)
    else:
        cfg, target = runtime.load_target(cfg)
        paths = [ft for _, ft in finetune(cfg, res, target)]
    runtime.wait_for_ranks()
    say(f"done: {len(paths)} model(s) under {cfg.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    runtime.run_main(main)
