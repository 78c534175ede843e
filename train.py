"""Train the source models (Ada-GVAE on Texture-dSprites) and finetune them on a target (β-VAE).

    python train.py --stage source   [--backbone auto|dino|pixels|resnet152|...] [--arch conv|se2] [--quick] ...
    python train.py --stage finetune --target synthetic-cells [--epochs 20] [--quick] ...
    torchrun --nproc-per-node=K train.py --stage source ...   # rank r of K trains models r, r+K, ... on cuda:r

Read top to bottom: 1. the Config (the paper's values as defaults); 2. what a run resolves (backbone, weights,
device) and its folder; 3. the inputs (Φ or pixels); 4. the training loop, `fit` around the one-model
`train_step`; 5. the pipeline that evaluate.py calls too; 6. the script; 7. --parallel-models, which trains
every seed × β model at once as one stacked model (nothing above it mentions it).
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import drl
import folders


# --- 1. Config: every setting of the protocol; the defaults are the paper's (Dapueto et al. 2025, Sec. III) ------

def _opt(default, help, **argparse_kw):
    return field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclass(frozen=True)
class Config:
    # inputs
    backbone: str = _opt("auto", "dino (frozen DINO ViT-B/16 features), a torchvision ImageNet classifier (resnet152, "
                                 "vgg19, ...), pixels (64x64 RGB), or auto: dino when its weights resolve, else pixels")
    arch: str = _opt("conv", "pixel VAE: conv or SE(2,N) (se2.py)", choices=["conv", "se2"])
    method: str = _opt("adagvae", "source-stage objective", choices=["adagvae", "betavae"])
    dino_weights: str = _opt(None, "DINO ViT-B/16 checkpoint (else $DRL_DINO_WEIGHTS, hub cache, download)")
    backbone_weights: str = _opt(None, "the torchvision backbone's state dict (else hub cache, download)")
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
    holdout_class: str = _opt(None, "leave this class (or an unambiguous prefix) out of finetuning and classifiers")
    max_bad_images: float = _opt(folders.BAD_IMAGE_TOLERANCE, "undecodable target images to skip: a count (>= 1) "
                                                              "or a fraction (< 1); more stop the run")
    # run
    out: str = _opt("runs", "run folder")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...; torchrun: cuda:$LOCAL_RANK")
    parallel_models: bool = _opt(False, "train all seeds x betas at once as one stacked model (torch.func)")
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
    """One --flag per Config field (`several`: fields that take a list), plus --check-data; defaults stay None,
    so the preset (paper or --quick) fills what the command line leaves out."""
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


# --- 2. What a run resolves (backbone, weights, device), never written into the Config; the run folder -----------

@dataclass(frozen=True)
class Resolved:
    backbone: str          # "dino", a torchvision builder name or "pixels" (what "auto" became)
    weights: str = None    # the backbone's weights file
    device: str = "cpu"    # "cpu" or "cuda:N", always with its index
    precision: str = "fp32"  # of feature extraction (what "auto" became)
    rank: int = 0          # under torchrun this process is rank RANK of WORLD_SIZE; alone, 0 of 1
    world: int = 1

    @functools.cached_property
    def weights_digest(self):
        """sha256 of the weights file (None without one): in cache keys and configs, hashed once per run."""
        return file_digest(self.weights) if self.weights else None


def resolve_device(cfg):
    """dict(device, precision, rank, world). auto is CUDA when a GPU is visible; a CUDA device always has its
    index: cuda:0 for one process, cuda:$LOCAL_RANK under torchrun. A GPU that is not there is an error."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: no CUDA GPU is visible to PyTorch here "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        if torch.device(device).index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    return dict(device=device, precision=precision, rank=rank, world=world)


def resolve(cfg):
    """Decide the backbone (auto = dino when its weights resolve, else pixels), its weights and the device,
    and say in one line which backbone it is."""
    at = resolve_device(cfg)
    if cfg.arch == "se2" and cfg.backbone not in ("auto", "pixels"):
        raise ValueError("--arch se2 works on pixels only; use --backbone pixels with --arch se2")
    if cfg.backbone == "pixels" or (cfg.backbone == "auto" and cfg.arch == "se2"):
        return Resolved("pixels", None, **at)
    if cfg.backbone not in ("auto", "dino"):
        weights, how = drl.resolve_torchvision_weights(cfg.backbone, cfg.backbone_weights)
        say(f"backbone: torchvision {cfg.backbone} from {weights} ({how})")
        return Resolved(cfg.backbone, weights, **at)
    try:
        weights, how = drl.resolve_dino_weights(cfg.backbone_weights or cfg.dino_weights)
    except FileNotFoundError as e:
        if cfg.backbone == "dino" or cfg.dino_weights or cfg.backbone_weights:
            raise
        say(f"backbone: {e}; falling back to --backbone pixels")
        return Resolved("pixels", None, **at)
    say(f"backbone: DINO ViT-B/16 from {weights} ({how})")
    return Resolved("dino", weights, **at)


say = functools.partial(print, flush=True)  # what a run tells its user, at once


def file_digest(path):
    """sha256 hex digest of a file (weights, checkpoints)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(**parts):
    """Short sha256 over a canonical JSON of everything that changes a cached result."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=lambda o: np.asarray(o).tolist())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def new_model(cfg, x):
    """A fresh VAE for the inputs x: an MLP on features Φ (N, D), else --arch on pixels (N, 3, 64, 64)."""
    if x.dim() == 2:
        return drl.FeatureVAE(in_dim=x.shape[1], latent_dim=cfg.latent_dim)
    return drl.build_model({"kind": cfg.arch, ("n_iso" if cfg.arch == "se2" else "latent_dim"): cfg.latent_dim})


def load_target(cfg, save=True):
    """(cfg with --holdout-class spelled as the class is, the target with every image decoded, the split file).
    With `save` the split is written to out/splits/<target>-<kind>.json (a project split is read back from
    there by later runs) and skipped images are listed in out/bad-images-<target>.txt."""
    if not cfg.target:
        raise ValueError(f"--target is required for this stage; one of: {', '.join(folders.TARGETS)}")
    project = os.path.join(cfg.out, "splits", f"{cfg.target}-project.json")
    saved = folders.read_split(project) if os.path.exists(project) else None
    bad_list = os.path.join(cfg.out, f"bad-images-{cfg.target}.txt")
    try:
        target = folders.load_target(cfg.target, root=cfg.data_root, split=saved, split_name=project,
                                     max_bad=cfg.max_bad_images)
    except folders.BadImages as e:
        _list_bad_images(e.bad, bad_list if save else None)
        raise ValueError(f"{e}" + (f"; the list is in {bad_list}" if save else "")) from None
    if cfg.holdout_class:
        cfg = dataclasses.replace(cfg, holdout_class=target.class_named(cfg.holdout_class))
    if target.bad:
        _list_bad_images(target.bad, bad_list if save else None)
        warnings.warn(f"skipped {len(target.bad)} undecodable image(s) of {target.path}, listed above" +
                      (f" and in {bad_list}" if save else ""))
    split_file = os.path.join(cfg.out, "splits", f"{cfg.target}-{target.kind}.json")
    if save:
        drl.write_text(split_file, json.dumps(target.split_record(), indent=1))
        say(folders.describe(target, short=True) + f" ({split_file})")
    return cfg, target, split_file


def _list_bad_images(bad, path):
    print("".join(f"bad image: {name}: {reason}\n" for name, reason in bad), end="", file=sys.stderr)
    if path:
        drl.write_text(path, "".join(f"{name}\t{reason}\n" for name, reason in bad))


def check_config(path, saved, wanted):
    """A checkpoint of another configuration is refused in one line naming the first setting that differs."""
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff:
        key, there, now = diff[0], saved.get(diff[0]), wanted.get(diff[0])
        if isinstance(there, dict) and isinstance(now, dict):  # the source model's config, inside a finetuned one
            key = min(k for k in set(there) | set(now) if there.get(k) != now.get(k))
            key, there, now = f"source {key}", there.get(key), now.get(key)
        key = NOT_FLAGS.get(key.split()[-1], key)
        raise ValueError(f"{path} was trained with other settings: {key} is {there!r} there, {now!r} now; use "
                         f"another --out, or delete {os.path.dirname(path)} to train it again")


# what the settings of a checkpoint that are no flag of their own stand for, as a refusal names them
NOT_FLAGS = {"dataset": "Texture-dSprites (--textures, --dsprites)", "backbone_weights": "the backbone weights",
             "target": "the target images (each one's sha256 is in out/splits/)"}


# --- 3. Inputs: Φ (cached) or 64×64 pixels of Texture-dSprites and of a target -----------------------------------

def features(cfg, res, name, digest, n, images_fn):
    """Φ of n images through the frozen backbone, cached under out/features/ by everything that changes it."""
    key = cache_key(dataset=digest, backbone=res.backbone, weights=res.weights_digest, precision=res.precision,
                    preprocessing=drl.preprocessing(res.backbone))
    path = os.path.join(cfg.out, "features", f"{name}-{key}.npy")
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    say(f"features: extracting {res.backbone} features of {n} {name} images -> {path}")
    backbone = drl.load_backbone(res.backbone, res.weights, device=res.device)
    t0 = time.time()
    phi = drl.extract_features(backbone, images_fn, n, path, precision=res.precision, device=res.device)
    say(f"features: {n} images in {time.time() - t0:.0f} s")
    return phi


class SourceInputs:
    """The model input of every Texture-dSprites image as one tensor on the device, `x`, in grid order (row i is
    image i of TextureDSprites): uint8 images (N, 3, 64, 64), scaled to [0, 1] per batch, or standardised Φ (N, D).
    """

    def __init__(self, cfg, res):
        self.dataset = data.TextureDSprites(textures=cfg.textures, dsprites=cfg.dsprites)
        n = len(self.dataset)
        if res.backbone == "pixels":
            images = self.dataset.images(np.arange(n))
            self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(res.device)
            self.stats = {}
        else:
            phi = features(cfg, res, "texture-dsprites", self.dataset.digest, n, self.dataset.images)
            mean, std = drl.feature_stats(phi)
            self.stats = {"feature_mean": torch.as_tensor(mean), "feature_std": torch.as_tensor(std)}
            self.x = torch.as_tensor(drl.standardise(phi, mean, std), dtype=torch.float32).to(res.device)

    def batches(self, batch_size, paired):
        """batch_fn(seed, step) for fit: the indices into self.x of pairs that differ in one factor (Ada-GVAE),
        (2, batch_size), or of single images (batch_size,); drawn on the host, a pure function of (seed, step)."""
        to_index, sizes = self.dataset.factors_to_index, self.dataset.factor_sizes

        def batch_fn(seed, step):
            rng = np.random.default_rng(step_seed(seed, step))
            if paired:
                f1, f2, _ = data.sample_pairs(sizes, batch_size, rng)
                return np.stack([to_index(f1), to_index(f2)])
            return to_index(data.sample_factors(sizes, batch_size, rng))
        return batch_fn


def target_inputs(cfg, res, images, stats, name):
    """The model input for an ImageSet, on the host: uint8 64×64 pixels or standardised Φ (source statistics)."""
    if res.backbone != "pixels":
        phi = features(cfg, res, name, images.digest, len(images), lambda idx: images.images(idx, 224))
        return torch.as_tensor(drl.standardise(phi, stats["feature_mean"].numpy(), stats["feature_std"].numpy()),
                               dtype=torch.float32)
    return torch.from_numpy(images.images(np.arange(len(images)), 64)).permute(0, 3, 1, 2).contiguous()


def epoch_batches(n, batch_size):
    """batch_fn(seed, step) for finetuning on n images: shuffled epochs, step t takes its slice of epoch
    t // steps_per_epoch's permutation, a pure function of (seed, step). Returns indices (batch_size,)."""
    steps_per_epoch = math.ceil(n / batch_size)

    def batch_fn(seed, step):
        epoch, i = divmod(step, steps_per_epoch)
        return np.random.default_rng((seed, epoch)).permutation(n)[i * batch_size:(i + 1) * batch_size]
    return batch_fn


# --- 4. The training loop: fit trains each run in turn through train_step, resuming from its checkpoint. Every
#    random draw of a step is a pure function of (seed, step): a resumed run equals an uninterrupted one.

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

    @property
    def checkpoint(self):
        return os.path.join(self.folder, "checkpoint.pt")


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient: the run stops and its last good checkpoint is kept."""


def step_seed(seed, step):
    """The seed of step `step` of run `seed`: every draw of a step depends on (seed, step) alone."""
    return (int(seed) * 1_000_003 + int(step)) % (2 ** 63)


def seed_torch(seed, device):
    """torch.manual_seed(seed) for the generators a step draws from (the CPU's, the GPU's), at 1 µs instead of 75."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def make_optimizer(params, optimizer="adam", *, lr=1e-4, weight_decay=0.0):
    """Adam (Kingma & Ba 2015) or AdamW (Loshchilov & Hutter 2019), PyTorch's fused kernel where there is one."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    return kind(params, lr=lr, weight_decay=weight_decay, fused=fused)


def get_batch(x, idx):
    """The rows of x (on the device) that the host-drawn indices name: one non-blocking copy of the indices,
    uint8 pixels scaled to [0, 1] there. Indices (2, B) give a pair (x1, x2)."""
    batch = drl.to_model(x[drl.to_device(torch.from_numpy(idx), x.device)])
    return (batch[0], batch[1]) if idx.ndim == 2 else batch


def train_step(model, opt, batch, beta, grad_clip=1.0):
    """One optimiser step: the loss of model(batch, beta) (a β-VAE on images, the Ada-GVAE on a pair), backward,
    the gradient norm clipped to grad_clip, Adam. Returns (loss, recon, kl, grad norm), left on the device."""
    out = model(batch, beta)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return torch.stack([out["loss"], out["recon"], out["kl"], norm]).detach()


def fit(runs, x, batch_fn, *, steps, lr=1e-4, optimizer="adam", weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
        log_every=None, checkpoint_every_s=120.0, label="fit"):
    """Train every run to `steps` optimiser steps, one after another, each resumed from folder/checkpoint.pt.

    x holds every input of the dataset on the training device (uint8 pixels or float features); batch_fn(seed,
    step) returns the int64 indices of a step's batch, drawn on the host: (B,) images or (2, B) pairs. Nothing
    is read back from the device between log steps (every `log_every`, default steps / 200 but at least 50):
    there the mean losses go to folder/log.csv and one line is printed; the checkpoint (CPU tensors, atomic) is
    written every checkpoint_every_s and at the end. A non-finite loss raises TrainingDiverged. Returns the
    final checkpoints.
    """
    log_every, t0 = log_every or max(50, steps // 200), time.time()
    resume(runs, steps)
    total = todo = sum(steps - r.start for r in runs)
    for k, run in enumerate(runs):
        model = run.model.to(x.device).train()
        opt = make_optimizer(model.parameters(), optimizer, lr=lr, weight_decay=weight_decay)
        if run.optimizer_state:
            opt.load_state_dict(run.optimizer_state)
        log, last, saved = CsvLog(run.folder, run.start), run.start, time.time()
        sums = torch.zeros(4, dtype=torch.float64, device=x.device)  # stays on the device until a log step
        for step in range(run.start, steps):
            seed_torch(step_seed(run.seed, step), x.device)  # ε of the reparameterisation is drawn in model()
            beta = run.beta * drl.beta_warmup(step, 1.0, warmup_steps)
            sums += train_step(model, opt, get_batch(x, batch_fn(run.seed, step)), beta, grad_clip)
            done = step + 1
            if done % log_every and done != steps:
                continue
            means = log_interval([run], [log], sums, done - last, done, [beta])
            todo, last = todo - (done - last), done
            say(progress(label, f"model {k + 1}/{len(runs)}", done, steps, means[0, 0], total, todo, t0))
            if done == steps or time.time() - saved >= checkpoint_every_s:
                save_checkpoints([run], [model.state_dict()], [opt.state_dict()], done, steps, means)
                saved = time.time()
        log.close()
    return [drl.load_checkpoint(r.checkpoint) for r in runs]


def progress(label, who, step, steps, loss, total, todo, t0):
    """The line of a log step: which model(s), step, loss, speed, and the ETA of the whole stage (`todo` of
    `total` model steps left, at the speed since the stage began)."""
    rate = (total - todo) / max(time.time() - t0, 1e-9)
    return (f"[{label}] {who}: step {step}/{steps}, loss {float(loss):.2f} | {rate:.1f} steps/s, stage ETA "
            f"{todo / max(rate, 1e-9) / 60:.1f} min")


def resume(runs, steps):
    """Load each run's checkpoint, if any, into its model (and its optimiser's state into the run); a checkpoint
    of another configuration is refused."""
    for run in runs:
        if os.path.exists(run.checkpoint):
            ckpt = drl.load_checkpoint(run.checkpoint)
            check_config(run.checkpoint, ckpt["config"], saved_config(run, steps))
            run.model.load_state_dict(ckpt["model"])
            run.start, run.optimizer_state = ckpt["step"], ckpt["optimizer"]


def saved_config(run, steps):
    """The configuration a run's checkpoint records: the run's settings, its architecture and its steps."""
    return dict(run.config, model=drl.model_config(run.model), steps=steps)


def save_checkpoints(runs, weights, opt_states, step, steps, means):
    """Each run's checkpoint, written atomically: its weights and what an optimiser of that model alone holds."""
    for run, w, state, m in zip(runs, weights, opt_states, means):
        state = {"param_groups": state["param_groups"], "state": state["state"]}  # one order: the same bytes
        drl.save_checkpoint(run.checkpoint, {"config": saved_config(run, steps), "model": w, "optimizer": state,
                                             "step": step, "done": step >= steps, "loss": float(m[0]), **run.extra})


def log_interval(runs, logs, sums, n, step, betas):
    """The mean (loss, recon, KL, grad norm) of each run over the last n steps, (M, 4) on the host, written to
    each run's log.csv (a non-finite one raises TrainingDiverged); `sums` is zeroed for the next interval."""
    means = (sums / n).cpu().reshape(len(runs), 4)
    sums.zero_()
    bad = (~torch.isfinite(means)).any(dim=1).nonzero()
    if len(bad):
        m, run = int(bad[0]), runs[int(bad[0])]
        what = "loss" if not torch.isfinite(means[m, 0]) else "gradient norm"
        raise TrainingDiverged(f"{what} became {means[m, 0 if what == 'loss' else 3].item()} by step {step} (seed "
                               f"{run.seed}, beta {run.beta}); the last good checkpoint is kept in {run.folder}; "
                               f"lower --lr or check the input data")
    for log, row, beta in zip(logs, means, betas):
        log.write(step, row, beta)
    return means


class CsvLog:
    """folder/log.csv: one row per log step; rows past the checkpoint of an interrupted run are dropped."""

    def __init__(self, folder, start):
        path = os.path.join(folder, "log.csv")
        rows = [["step", "loss", "recon", "kl", "beta"]]
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows += [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= start]
        with drl.atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        self.file = open(path, "a", newline="")

    def write(self, step, means, beta):
        csv.writer(self.file).writerow([step] + [f"{v:.6g}" for v in means[:3].tolist()] + [f"{beta:.4g}"])
        self.file.flush()

    def close(self):
        self.file.close()


# --- 5. The pipeline evaluate.py calls too: train the source models, finetune them on a target -------------------

def my_models(cfg, res):
    """The (β, seed) models of this process: all of them, or under torchrun rank r of K takes r, r+K, ..."""
    models = [(beta, seed) for beta in cfg.betas for seed in cfg.seeds]
    if res.rank >= len(models):
        say(f"rank {res.rank} of {res.world}: no model to train ({len(models)} model(s) in all)")
    return models[res.rank::res.world]


def trained_already(path, settings):
    """Is the model at `path` fully trained (False when there is none)? One trained with other settings than
    `settings` (what the run records) is refused: never silently reused, never overwritten."""
    if not os.path.exists(path):
        return False
    ckpt = drl.load_checkpoint(path)
    check_config(path, {k: v for k, v in ckpt["config"].items() if k not in ("model", "steps")}, settings)
    return ckpt.get("done", False)


def train_source(cfg, res):
    """Train every seed × β source model of this process that is not finished yet; returns their checkpoints."""
    digest = data.TextureDSprites(textures=cfg.textures, dsprites=cfg.dsprites).digest
    todo, paths = [], []
    for beta, seed in my_models(cfg, res):
        config = {"stage": "source", "backbone": res.backbone, "arch": cfg.arch, "method": cfg.method,
                  "backbone_weights": res.weights_digest, "precision": res.precision if res.weights else None,
                  "latent_dim": cfg.latent_dim, "dataset": digest, "seed": seed, "beta": beta,
                  "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size, "lr": cfg.lr}
        folder = source_folder(cfg, res, beta, seed)
        paths.append(os.path.join(folder, "checkpoint.pt"))
        if not trained_already(paths[-1], config):
            todo.append((seed, beta, folder, config))
    label = f"source {model_tag(cfg, res)}"
    if not todo:
        say(f"{label}: all {len(paths)} model(s) trained already" if paths else f"{label}: nothing to train here")
        return paths
    src, runs = SourceInputs(cfg, res), []
    for seed, beta, folder, config in todo:
        torch.manual_seed(seed)
        runs.append(Run(new_model(cfg, src.x), seed, beta, folder, config, src.stats))
    say(f"{label}: training {len(runs)} model(s), {cfg.steps} steps each" +
        (", stacked (--parallel-models)" if cfg.parallel_models else ""))
    (fit_stacked if cfg.parallel_models else fit)(
        runs, src.x, src.batches(cfg.batch_size, cfg.method == "adagvae"), steps=cfg.steps, lr=cfg.lr,
        optimizer="adam", warmup_steps=cfg.warmup_steps, label=label)
    return paths


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
        if not trained_already(pairs[-1][1], config):
            stats = {k: ckpt[k] for k in ("feature_mean", "feature_std") if k in ckpt}
            runs.append(Run(drl.load_model(path)[0], seed, beta, folder, config, stats))
    if not runs:
        if pairs:
            say(f"finetune {cfg.target}: all {len(pairs)} model(s) finetuned already")
        return pairs
    images = target.train  # minus the held-out class, if any
    if cfg.holdout_class:
        images = images.subset(np.flatnonzero(images.labels != target.classes.index(cfg.holdout_class)))
    x = target_inputs(cfg, res, images, runs[0].extra, f"{cfg.target}-train").to(res.device)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    say(f"finetune {cfg.target}: {len(runs)} model(s), {cfg.epochs} epochs of {len(x)} images ({steps} steps)")
    (fit_stacked if cfg.parallel_models else fit)(
        runs, x, epoch_batches(len(x), cfg.batch_size), steps=steps, lr=cfg.lr, optimizer="adamw",
        weight_decay=0.01, label=f"finetune {cfg.target}")
    return pairs


# --- 6. The script: its errors are one line on stderr and exit code 2, never a traceback -------------------------

@contextlib.contextmanager
def one_line_errors():
    """What a user of the scripts sees of an error: one line on stderr, exit code 2 (130 for Ctrl-C)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted: the checkpoints written so far are kept; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    except torch.cuda.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({drl.one_line(e, 100)}); lower --batch-size or drop --parallel-models; "
              f"the checkpoints written so far are kept and the same command resumes", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def use_device(res):
    """On CUDA the run's GPU becomes the current device (else pinned memory and contexts land on GPU 0)."""
    if res.device.startswith("cuda"):
        torch.cuda.set_device(res.device)


def check_data(cfg):
    print(folders.describe(load_target(cfg, save=False)[1]))  # read and checked as a run reads it; nothing written


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["source", "finetune"])
    add_config_args(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with one_line_errors():
        cfg = config_from_args(args)
        if args.check_data:
            return check_data(cfg)
        if not args.stage:
            raise ValueError("--stage source or --stage finetune is required (or --check-data)")
        t0, res = time.time(), resolve(cfg)
        use_device(res)
        if args.stage == "source":
            paths = train_source(cfg, res)
        else:
            cfg, target, _ = load_target(cfg)
            paths = [ft for _, ft in finetune(cfg, res, target)]
        say(f"done: {len(paths)} model(s) under {cfg.out} in {time.time() - t0:.0f} s")


# --- 7. --parallel-models: the runs of a stage trained as one stacked model, each exactly as it trains alone.
#    A Stack holds every trainable weight of M models of one architecture as one tensor with a leading model
#    dim (torch.func.stack_module_state) and runs each model's own objective through torch.vmap. Adam is
#    elementwise, so one Adam over the stacked tensors is each model's own Adam; the gradient norm is clipped
#    per model (one joint norm would couple them), and each model's ε is drawn after seeding with its own
#    (seed, step), where a model alone draws it inside its forward.

class Stack(torch.nn.Module):
    """M models as one: forward(batch (M, ...), beta (M,), noise (M, ...)) -> dict of (M,) losses."""

    def __init__(self, models):
        super().__init__()
        first = models[0]
        if list(first.buffers()):
            raise ValueError(f"{type(first).__name__} keeps buffers (BatchNorm running statistics) per model, which "
                             f"the stacked step cannot hold; drop --parallel-models")
        trainable = [k for k, p in first.named_parameters() if p.requires_grad]
        weights = torch.func.stack_module_state(models)[0]
        self.names = [k for k in weights if k in trainable]
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(weights[k].detach()) for k in self.names])
        call = lambda w, b, beta, noise: torch.func.functional_call(first, w, (b, beta, noise))  # noqa: E731
        self.objective = torch.vmap(call)  # the first model lends its structure only (not registered)

    def forward(self, batch, beta, noise):
        return self.objective(dict(zip(self.names, self.weights)), batch, beta, noise)

    def unstack(self, models):
        """Copy model m's slice of every stacked weight into models[m]."""
        for m, model in enumerate(models):
            model.load_state_dict({k: w[m] for k, w in zip(self.names, self.weights)}, strict=False)


def stacked_step(stack, opt, batch, beta, noise, grad_clip=1.0):
    """train_step for a Stack: the models share no weight, so the backward of their summed losses gives each its
    own gradients; each model's gradient norm is clipped on its own. Returns (M, 4) on the device."""
    out = stack(batch, beta, noise)
    opt.zero_grad(set_to_none=True)
    out["loss"].sum().backward()
    grads = [p.grad for p in stack.parameters()]
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], 1),
                                     dim=1)
    scale = (grad_clip / (norms + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_ does, per model
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
    opt.step()
    return torch.stack([out["loss"], out["recon"], out["kl"], norms], dim=1).detach()


def stacked_batch(runs, x, batch_fn, step):
    """Every run's batch (a leading model dim; the indices of all go over in one copy) and its ε, each drawn right
    after seeding with (seed, step) as a run alone draws it; runs with the same seed share them."""
    drawn, noise = {}, {}
    for r in runs:
        if r.seed not in drawn:
            seed_torch(step_seed(r.seed, step), x.device)
            drawn[r.seed] = batch_fn(r.seed, step)
            noise[r.seed] = torch.randn(drawn[r.seed].size, r.model.config["latent_dim"], device=x.device)
    idx = np.stack([drawn[r.seed] for r in runs])  # (M, B) images or (M, 2, B) pairs
    batch = drl.to_model(x[drl.to_device(torch.from_numpy(idx), x.device)])
    return (batch[:, 0], batch[:, 1]) if idx.ndim == 3 else batch, torch.stack([noise[r.seed] for r in runs])


def fit_stacked(runs, x, batch_fn, *, steps, lr=1e-4, optimizer="adam", weight_decay=0.0, warmup_steps=0,
                grad_clip=1.0, log_every=None, checkpoint_every_s=120.0, label="fit"):
    """fit() for every run at once (the runs resumed at the same step train together as one Stack)."""
    log_every, t0 = log_every or max(50, steps // 200), time.time()
    resume(runs, steps)
    total = todo = sum(steps - r.start for r in runs)
    for start in sorted({r.start for r in runs if r.start < steps}):
        group = [r for r in runs if r.start == start]
        stack = Stack([r.model.to(x.device).train() for r in group])
        opt = make_optimizer(stack.parameters(), optimizer, lr=lr, weight_decay=weight_decay)
        if start:
            opt.load_state_dict(_stack_optimizer_states([r.optimizer_state for r in group]))
        logs, last, saved = [CsvLog(r.folder, start) for r in group], start, time.time()
        sums = torch.zeros(len(group), 4, dtype=torch.float64, device=x.device)
        betas = torch.tensor([r.beta for r in group], device=x.device)  # scaled on the device each step
        for step in range(start, steps):
            batch, noise = stacked_batch(group, x, batch_fn, step)
            ramp = drl.beta_warmup(step, 1.0, warmup_steps)
            sums += stacked_step(stack, opt, batch, betas * ramp, noise, grad_clip)
            done = step + 1
            if done % log_every and done != steps:
                continue
            means = log_interval(group, logs, sums, done - last, done, [r.beta * ramp for r in group])
            todo, last = todo - len(group) * (done - last), done
            say(progress(label, f"models {runs.index(group[0]) + 1}-{runs.index(group[-1]) + 1}/{len(runs)}", done,
                         steps, means[:, 0].mean(), total, todo, t0))
            if done == steps or time.time() - saved >= checkpoint_every_s:
                stack.unstack([r.model for r in group])
                state = opt.state_dict()
                save_checkpoints(group, [r.model.state_dict() for r in group],
                                 [_model_optimizer_state(state, m) for m in range(len(group))], done, steps, means)
                saved = time.time()
        for log in logs:
            log.close()
    return [drl.load_checkpoint(r.checkpoint) for r in runs]


def _stack_optimizer_states(states):
    """Per-model optimiser state_dicts -> the state_dict of one optimiser over the stacked tensors."""
    first = states[0]
    return {"param_groups": first["param_groups"],
            "state": {i: {k: v if k == "step" else torch.stack([s["state"][i][k] for s in states])
                          for k, v in st.items()} for i, st in first["state"].items()}}


def _model_optimizer_state(state, m):
    """Model m's slice of a stacked optimiser's state_dict: what an optimiser of that model alone holds."""
    return {"param_groups": state["param_groups"],
            "state": {i: {k: v if k == "step" else v[m].clone() for k, v in st.items()}
                      for i, st in state["state"].items()}}


if __name__ == "__main__":
    main()
