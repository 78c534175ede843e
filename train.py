"""Train the source models (Ada-GVAE on Texture-dSprites) and finetune them on a target (β-VAE).

    python train.py --stage source   [--backbone auto|dino|pixels] [--arch conv|se2] [--quick] ...
    python train.py --stage finetune --target synthetic-cells [--epochs 20] [--quick] ...

Everything goes under --out (default runs/): feature caches in features/, one folder per model with its
checkpoint.pt (weights, config, optimiser; written atomically, resumed automatically) and log.csv.
"""
import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

import data
import drl

PAPER = {"seeds": list(range(10)), "betas": [1.0, 2.0], "steps": 400_000, "warmup": 50_000, "epochs": 20}
QUICK = {"seeds": [0, 1], "betas": [1.0], "steps": 500, "epochs": 5}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def add_common_args(p):
    g = p.add_argument_group("inputs")
    g.add_argument("--backbone", choices=["auto", "dino", "pixels"], default="auto",
                   help="dino: frozen DINO ViT-B/16 features; pixels: 64x64 RGB; auto: dino when weights resolve")
    g.add_argument("--arch", choices=["conv", "se2"], default="conv", help="pixel VAE: conv or SE(2,N) (se2.py)")
    g.add_argument("--method", choices=["adagvae", "betavae"], default="adagvae", help="source-stage objective")
    g.add_argument("--dino-weights", help="DINO ViT-B/16 checkpoint (else $DRL_DINO_WEIGHTS, hub cache, download)")
    g.add_argument("--textures", help="folder with five grayscale texture images (default: procedural)")
    g.add_argument("--dsprites", help="the real dsprites_ndarray_*.npz for the shape masks (default: procedural)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="DINO feature extraction")
    g = p.add_argument_group("protocol (defaults: the paper's)")
    g.add_argument("--seeds", type=int, nargs="+", help="default: 0..9 (quick: 0 1)")
    g.add_argument("--betas", type=float, nargs="+", help="default: 1 2 (quick: 1)")
    g.add_argument("--steps", type=int, help=f"source steps (default {PAPER['steps']}, quick {QUICK['steps']})")
    g.add_argument("--epochs", type=int, help=f"finetuning epochs (default {PAPER['epochs']}, quick {QUICK['epochs']})")
    g.add_argument("--batch-size", type=int, default=64, help="pairs (source) or images (finetune) per step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--latent-dim", type=int, default=10)
    g.add_argument("--quick", action="store_true", help="the same pipeline, small enough for a 2-core CPU")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="run folder (default runs/)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--parallel-models", action="store_true",
                   help="train all seeds x betas of the source sweep in one process with stacked weights "
                        "(feature and conv VAEs; same weights as training them one by one)")
    g.add_argument("--target", help="target dataset: " + ", ".join(data.TARGETS))
    g.add_argument("--data-root", help="folder holding the real targets (default $DRL_DATA or ./data)")
    g.add_argument("--holdout-class", help="leave this class out of finetuning (open-set study)")


def settle(args):
    """Fill protocol defaults (paper, or --quick) and check what argparse cannot."""
    preset = dict(PAPER, **QUICK) if args.quick else PAPER
    for k in ("seeds", "betas", "steps", "epochs"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.warmup = round(args.steps * PAPER["warmup"] / PAPER["steps"])  # the paper's 50k of 400k, same fraction
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for k in ("steps", "epochs", "batch_size", "latent_dim"):
        if getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    _check_writable(args.out)
    return args


def _check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise OSError(f"cannot write to --out {folder} ({e.strerror}); choose a writable folder") from None


def say(msg):
    print(msg, flush=True)


def run_main(main):
    """Run a script's main(): library errors become one line on stderr and exit code 2, no traceback."""
    warnings.formatwarning = lambda m, c, *a, **k: f"warning: {m}\n"
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: checkpoints are kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# Inputs: every source image (or its DINO feature vector) as one tensor indexed by the factor grid
# ---------------------------------------------------------------------------------------------------------

def resolve_backbone(args):
    """Decide dino vs pixels once; remember it in args. Returns the DINO weights path or None."""
    if getattr(args, "_weights", "unset") != "unset":
        return args._weights
    args._weights = None
    if args.backbone in ("auto", "dino"):
        try:
            args._weights, how = drl.resolve_dino_weights(args.dino_weights)
        except FileNotFoundError as e:
            if args.backbone == "dino" or args.dino_weights:
                raise
            say(f"backbone: {e}; falling back to --backbone pixels")
            args.backbone = "pixels"
        else:
            args.backbone = "dino"
            say(f"backbone: DINO ViT-B/16 from {args._weights} ({how})")
    if args.backbone == "dino" and args.arch == "se2":
        raise ValueError("--arch se2 works on pixels only; use --backbone pixels with --arch se2")
    return args._weights


def source_dataset(args):
    return data.TextureDSprites(textures=args.textures, dsprites=args.dsprites)


def dino_features(args, name, digest, n, images_fn):
    """Φ of n images through the frozen ViT, cached under out/features/ by everything that changes it."""
    weights = resolve_backbone(args)
    key = drl.feature_cache_key(dataset=digest, weights=drl.weights_digest(weights), precision=args.precision,
                                preprocess="pad-square,resize224-bilinear-antialias,imagenet-norm,cls-final-norm")
    path = os.path.join(args.out, "features", f"{name}-{key}.npy")
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    say(f"features: extracting DINO features of {n} {name} images -> {path}")
    vit = drl.load_dino(weights, device=args.device)
    t0 = time.time()

    def progress(done, total):
        say(f"  features {done}/{total} ({done / max(time.time() - t0, 1e-9):.1f} img/s)")
    return drl.extract_features(vit, images_fn, n, path, precision=args.precision, device=args.device,
                                progress=progress)


def to_model(x):
    """Stored inputs -> model inputs: uint8 pixels become floats in [0, 1]; features pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


class SourceInputs:
    """The model input of every Texture-dSprites image as one tensor, addressed by factor values.

    pixels: uint8 images (N, 3, 64, 64), scaled to [0, 1] per batch; dino: standardised Φ (N, 768).
    Exposes `factor_sizes` and `render(factors)` so metrics.disentanglement_scores can use it directly.
    """

    def __init__(self, args):
        self.dataset = source_dataset(args)
        self.factor_sizes, self.factor_names = self.dataset.factor_sizes, self.dataset.factor_names
        n = len(self.dataset)
        if resolve_backbone(args) is None:
            images = self.dataset.images(np.arange(n))
            self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(args.device)
            self.stats = None
        else:
            phi = dino_features(args, "texture-dsprites", self.dataset.digest, n, self.dataset.images)
            mean, std = drl.feature_stats(phi)
            self.stats = {"feature_mean": torch.as_tensor(mean), "feature_std": torch.as_tensor(std)}
            self.x = torch.as_tensor(drl.standardise(phi, mean, std), dtype=torch.float32).to(args.device)

    def render(self, factors):
        idx = torch.as_tensor(self.dataset.factors_to_index(np.asarray(factors)), device=self.x.device)
        return to_model(self.x[idx])

    def pair_batch(self, batch_size):
        def batch_fn(rng, step):
            f1, f2, _ = data.sample_pairs(self.factor_sizes, batch_size, rng)
            return self.render(f1), self.render(f2)
        return batch_fn

    def single_batch(self, batch_size):
        def batch_fn(rng, step):
            return self.render(data.sample_factors(self.factor_sizes, batch_size, rng))
        return batch_fn


def new_model(args):
    if args.backbone == "dino":
        return drl.FeatureVAE(latent_dim=args.latent_dim)
    if args.arch == "se2":
        import se2
        return se2.SE2VAE(n_iso=args.latent_dim)
    return drl.ConvVAE(latent_dim=args.latent_dim)


def model_tag(args):
    arch = "mlp" if args.backbone == "dino" else args.arch
    return f"{args.backbone}-{arch}-{args.method}-z{args.latent_dim}-{args.steps}steps"


def source_folder(args, beta, seed):
    return os.path.join(args.out, "source", model_tag(args), f"beta{beta:g}-seed{seed}")


def _progress_printer(label):
    def progress(info):
        say(f"[{label}] step {info['step']}/{info['steps']} loss {info['loss']:.2f} recon {info['recon']:.2f} "
            f"kl {info['kl']:.2f} beta {info['beta']:.2f} | {info['steps_per_s']:.1f} steps/s, "
            f"ETA {info['eta_s'] / 60:.1f} min")
    return progress


def train_source(args):
    """Train every seed × β source model that is not finished yet; returns their checkpoint paths."""
    resolve_backbone(args)
    digest = source_dataset(args).digest
    paired = args.method == "adagvae"
    todo = []
    for beta in args.betas:
        for seed in args.seeds:
            config = {"stage": "source", "backbone": args.backbone, "arch": args.arch, "method": args.method,
                      "latent_dim": args.latent_dim, "dataset": digest, "seed": seed, "beta": beta,
                      "steps": args.steps, "warmup_steps": args.warmup, "batch_size": args.batch_size, "lr": args.lr}
            todo.append((config, os.path.join(source_folder(args, beta, seed), "checkpoint.pt")))
    if all(_done(path, config) for config, path in todo):
        return [path for _, path in todo]
    src = SourceInputs(args)
    batch_fn = src.pair_batch(args.batch_size) if paired else src.single_batch(args.batch_size)
    if args.parallel_models:
        # every model of the sweep in one process, weights stacked (drl §9); each equals its sequential run
        models = []
        for config, _ in todo:
            torch.manual_seed(config["seed"])
            models.append(new_model(args))
        label = f"source {model_tag(args)} x{len(todo)} models"
        say(f"{label}: training {args.steps} steps, stacked (--parallel-models)")
        drl.fit_parallel(models, batch_fn, steps=args.steps, betas=[c["beta"] for c, _ in todo],
                         seeds=[c["seed"] for c, _ in todo], folders=[os.path.dirname(p) for _, p in todo],
                         configs=[c for c, _ in todo], paired=paired, lr=args.lr, warmup_steps=args.warmup,
                         grad_clip=1.0, device=args.device, progress=_progress_printer(label), extra=src.stats)
        return [path for _, path in todo]
    for config, path in todo:
        if _done(path, config):
            continue
        beta, seed = config["beta"], config["seed"]
        label = f"source {model_tag(args)} beta={beta:g} seed={seed}"
        say(f"{label}: training {args.steps} steps" + (" (resuming)" if os.path.exists(path) else ""))
        torch.manual_seed(seed)
        model = new_model(args)
        drl.fit(model, batch_fn, steps=args.steps, beta=beta, folder=os.path.dirname(path), config=config,
                paired=paired, lr=args.lr, optimizer="adam", warmup_steps=args.warmup, grad_clip=1.0, seed=seed,
                device=args.device, progress=_progress_printer(label), extra=src.stats)
    return [path for _, path in todo]


def _done(path, config=None):
    """Is the model at `path` fully trained? With `config`, a finished model of another configuration is an
    error, never silently reused."""
    if not os.path.exists(path):
        return False
    ckpt = drl.load_checkpoint(path)
    if config is not None:
        saved = {k: v for k, v in ckpt["config"].items() if k != "model"}  # fit() adds the model's own config
        drl.check_config(path, saved, config)
    return ckpt.get("done", False)


# ---------------------------------------------------------------------------------------------------------
# Finetuning on a target (β-VAE, whole model, AdamW, constant β)
# ---------------------------------------------------------------------------------------------------------

def load_target(args):
    if not args.target:
        raise ValueError(f"--target is required for this stage; one of: {', '.join(data.TARGETS)}")
    split = os.path.join(args.out, "splits", f"{args.target}.json")
    os.makedirs(os.path.dirname(split), exist_ok=True)
    return data.load_target(args.target, root=args.data_root, split_file=split)


def target_inputs(args, images, stats, name):
    """The model input for an ImageSet: uint8 64×64 pixels or standardised Φ (source statistics)."""
    if args.backbone == "dino":
        phi = dino_features(args, name, images.digest, len(images), lambda idx: images.images(idx, 224))
        return torch.as_tensor(drl.standardise(phi, stats["feature_mean"].numpy(), stats["feature_std"].numpy()),
                               dtype=torch.float32)
    return torch.from_numpy(images.images(np.arange(len(images)), 64)).permute(0, 3, 1, 2).contiguous()


def finetune_folder(args, beta, seed):
    target = args.target + (f"-without-{args.holdout_class}" if args.holdout_class else "")
    return os.path.join(args.out, "finetune", target, model_tag(args) + f"-{args.epochs}ep", f"beta{beta:g}-seed{seed}")


def train_split(args, target):
    """The training images of the finetuning stage: the train split, minus the held-out class if any."""
    train = target.train
    if args.holdout_class:
        if args.holdout_class not in target.classes:
            raise ValueError(f"--holdout-class {args.holdout_class!r} is not a class of {args.target}; "
                             f"classes: {', '.join(target.classes)}")
        keep = np.flatnonzero(train.labels != target.classes.index(args.holdout_class))
        train = train.subset(keep)
    return train


def train_finetune(args, target=None):
    """Finetune every source model on the target train split; returns (source, finetuned) checkpoint pairs."""
    target = target or load_target(args)
    sources = train_source(args)
    pairs = []
    x = None
    for path in sources:
        ckpt = drl.load_checkpoint(path)
        beta, seed = ckpt["config"]["beta"], ckpt["config"]["seed"]
        out = os.path.join(finetune_folder(args, beta, seed), "checkpoint.pt")
        pairs.append((path, out))
        config = {"stage": "finetune", "source": ckpt["config"], "target": target.digest,
                  "holdout": args.holdout_class, "seed": seed, "beta": beta, "epochs": args.epochs,
                  "batch_size": args.batch_size, "lr": args.lr}
        if _done(out, config):
            continue
        if x is None:
            train = train_split(args, target)
            x = target_inputs(args, train, ckpt, f"{args.target}-train").to(args.device)
            steps_per_epoch = math.ceil(len(x) / args.batch_size)
        model, _ = drl.load_model(path)
        label = f"finetune {args.target} {model_tag(args)} beta={beta:g} seed={seed}"
        say(f"{label}: {args.epochs} epochs of {len(x)} images")
        stats = {k: ckpt[k] for k in ("feature_mean", "feature_std") if k in ckpt}
        drl.fit(model, _epoch_batches(x, args.batch_size, seed), steps=args.epochs * steps_per_epoch, beta=beta,
                folder=os.path.dirname(out), config=config, paired=False, lr=args.lr, optimizer="adamw",
                weight_decay=0.01, warmup_steps=0, grad_clip=1.0, seed=seed, device=args.device,
                progress=_progress_printer(label), extra=stats)
    return pairs


def _epoch_batches(x, batch_size, seed):
    """Shuffled epochs: step t takes its slice of the permutation of epoch t // steps_per_epoch."""
    steps_per_epoch = math.ceil(len(x) / batch_size)

    def batch_fn(rng, step):
        epoch, i = divmod(step, steps_per_epoch)
        perm = np.random.default_rng((seed, epoch)).permutation(len(x))
        idx = torch.as_tensor(perm[i * batch_size:(i + 1) * batch_size], device=x.device)
        return to_model(x[idx])
    return batch_fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["source", "finetune"], required=True)
    add_common_args(p)
    args = settle(p.parse_args(argv))
    drl.keep_freed_memory()  # recycle freed activations instead of page-faulting them back (see there)
    t0 = time.time()
    if args.stage == "source":
        paths = train_source(args)
    else:
        paths = [ft for _, ft in train_finetune(args)]
    say(f"done: {len(paths)} model(s) under {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main)
