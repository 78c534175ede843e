"""Speed and memory of every stage of the pipeline, against references measured in the same run and machine.

    python benchmarks/bench.py            # full workloads (long on a 2-core CPU), writes bench.json
    python benchmarks/bench.py --quick    # small workloads, a few minutes on 2 cores
    python benchmarks/bench.py --device cuda --out bench-gpu.json

Imported by nothing; it imports the public names of the project's modules.

Every entry of bench.json is {"value", "unit", "workload": {batch, shapes, threads, device, dtype, ...}}.
Timings are the best of a few repetitions; compared pairs (our ViT vs torchvision's, one model after another
vs stacked) run interleaved, so that load from other processes hits both alike. The table prints the ratios
against the targets in TARGETS.

FLOPs: `matmul_gflops` counts 2·n³ per n×n matmul; a ViT-B/16 image is 17.6 G multiply-accumulates, 35.2 GFLOP
counted the same way (`vit_gflops_fp32`); `sweep_gflops` counts fwd + bwd with torch.utils.flop_counter.
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import data  # noqa: E402
import drl  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402

MACS_PER_IMAGE = 17.6                 # G multiply-accumulates of DINO ViT-B/16 per 224×224 image (fvcore)
# Targets: key -> (reference key or None, op, bound, what).
TARGETS = {
    "vit_img_s_fp32": ("torchvision_vit_img_s_fp32", ">=", 1.0, "ours / torchvision"),
    "vit_max_abs_diff_vs_torchvision": (None, "<=", 1e-4, "max |ours - tv|"),
    "vit_gflops_fp32": ("matmul_gflops_ceiling", ">=", 0.5, "GFLOP/s (35.2/img) / matmul"),
    "vit_img_s_bf16": ("vit_img_s_fp32", ">=", 2.5, "bf16 / fp32"),
    "vit_bf16_cosine_vs_fp32": (None, ">=", 0.999, "min cosine"),
    "matmul_gflops_bf16": ("matmul_gflops", None, None, "bf16 / fp32"),
    "sweep_models_steps_s_vectorised": ("sweep_models_steps_s_sequential", ">=", 1.5, "vectorised / seq."),
    "sweep_gflops": ("matmul_gflops_ceiling", ">=", 0.4, "GFLOP/s / best fp32 matmul"),
    "metrics_s": (None, "<", 60.0, "seconds"),
    "extract_peak_rss_mb": (None, "<=", 2048.0, "MB"),
}


# --- Timing helpers ----------------------------------------------------------------------------------------------

def sync(device):
    """Wait for `device` itself (torch.cuda.synchronize() waits for the current device only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fns, reps, device, warmup=1):
    """{name: [seconds]} of each fn of `fns` over `reps` interleaved rounds, after `warmup` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def entry(value, unit, workload, **extra):
    return {"value": value, "unit": unit, "workload": workload, **extra}


def workload(args, **kw):
    return {"threads": torch.get_num_threads(), "device": args.device, **kw}


def timing_stats(ts):
    return {"best_s": min(ts), "median_s": statistics.median(ts), "reps": len(ts)}


# --- 1. The ceiling: a large fp32 matmul -------------------------------------------------------------------------

def bench_matmul(args):
    """The ceilings every rate is compared with: fp32 (TF32 off) and bf16 matmuls."""
    n = 2048 if args.quick else 4096
    cuda = torch.device(args.device).type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: fp32 means fp32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(args.device)
    b = torch.randn(n, n, generator=g).to(args.device)
    # a loop of `loop` products per timing (about a second on a CPU), so that the ceiling sees the same
    # load from other processes as the multi-second ViT batches it is compared with
    loop = 50 if cuda else (3 if args.quick else 1)
    reps = 8 if args.quick else 10  # best of many: the ceiling must not be a disturbed run

    def rate(x, y):
        def run():
            for _ in range(loop):
                x @ y
        ts = best_times({"mm": run}, reps, args.device)["mm"]
        return loop * 2 * n ** 3 / min(ts) / 1e9, timing_stats(ts)

    wl = workload(args, shapes=f"({n},{n}) @ ({n},{n})", flops="2n^3", products_per_timing=loop)
    fp32, stats = rate(a, b)
    out = {"matmul_gflops": entry(fp32, "GFLOP/s", {**wl, "dtype": "float32", "tf32": False}, **stats)}
    supported = bf16_supported(args.device)
    if supported:
        bf16, stats = rate(a.bfloat16(), b.bfloat16())
        out["matmul_gflops_bf16"] = entry(bf16, "GFLOP/s", {**wl, "dtype": "bfloat16"}, **stats)
    else:
        out["matmul_gflops_bf16"] = entry(None, "GFLOP/s", {**wl, "dtype": "bfloat16"},
                                          note="bf16 not supported natively here; not measured")
    out["matmul_gflops_ceiling"] = entry(fp32, "GFLOP/s", {**wl, "dtype": "float32"})
    return out


# --- 2. ViT-B/16: ours vs torchvision on the same weights, fp32 and bf16 -----------------------------------------

_TV_BLOCK_KEYS = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
                  "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
                  "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
_TV_KEYS = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj": "conv_proj",
            "norm": "encoder.ln"}


def dino_to_torchvision_state_dict(sd):
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
    """torchvision's VisionTransformer with `model`'s weights, its head the identity: model(x)'s quantity."""
    c = model.config
    tv = torchvision.models.VisionTransformer(
        image_size=c["img_size"], patch_size=c["patch_size"], num_layers=c["depth"],
        num_heads=c["num_heads"], hidden_dim=c["embed_dim"], mlp_dim=int(c["embed_dim"] * c["mlp_ratio"]))
    tv.heads = nn.Identity()
    tv.load_state_dict(dino_to_torchvision_state_dict(model.state_dict()), strict=True)
    return tv.to(model.cls_token.device).eval().requires_grad_(False)


def vit_weights(args):
    """Our ViT-B/16 with DINO weights when they resolve without a download, else random (the same speed)."""
    try:
        path, how = drl.resolve_dino_weights(args.dino_weights, download=False)
        return drl.load_dino(path, device=args.device), f"DINO ({how})"
    except (FileNotFoundError, ValueError):
        torch.manual_seed(0)
        return drl.vit_base().to(args.device).eval().requires_grad_(False), "random init (no DINO weights)"


def bf16_supported(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN's fast bf16 kernels (else emulated)


def bench_vit(args, source):
    model, weights = vit_weights(args)
    tv = torchvision_reference(model)
    cuda = torch.device(args.device).type == "cuda"
    batch = 64 if cuda else (4 if args.quick else 8)
    reps = (10 if cuda else 4) if args.quick else (20 if cuda else 5)
    idx = np.random.default_rng(0).choice(len(source), batch, replace=False)
    x = drl.preprocess_images(source.images(idx), args.device)
    feats = {}

    def run(name, net, inp=x):  # keeps the output, so no extra forward is needed for the comparison
        feats[name] = net(inp)
    with torch.inference_mode():
        # on a CPU the first of the interleaved rounds is the warm-up (best-of ignores it)
        ts = best_times({"ours": lambda: run("ours", model), "tv": lambda: run("tv", tv)}, reps, args.device,
                        warmup=1 if cuda else 0)
    f32, f_tv = feats["ours"], feats["tv"]
    wl = workload(args, batch=batch, shapes=f"({batch},3,224,224)", dtype="float32", weights=weights,
                  input="Texture-dSprites, preprocessed", mode="inference_mode")
    ours = batch / min(ts["ours"])
    out = {
        "vit_img_s_fp32": entry(ours, "images/s", wl, **timing_stats(ts["ours"])),
        "torchvision_vit_img_s_fp32": entry(batch / min(ts["tv"]), "images/s",
                                            {**wl, "model": "torchvision vit_b_16, our weights via "
                                                            "torchvision_reference"}, **timing_stats(ts["tv"])),
        "vit_gflops_fp32": entry(ours * 2 * MACS_PER_IMAGE, "GFLOP/s", {**wl, "flops_per_image": "35.2e9"}),
        "vit_max_abs_diff_vs_torchvision": entry((f32 - f_tv).abs().max().item(), "abs",
                                                 {**wl, "output": "CLS after final norm (768)"}),
    }
    # bf16 autocast: on a CPU without native bf16 it is emulated (slow), so a smaller batch suffices.
    supported = bf16_supported(args.device)
    b16 = batch if supported else (1 if args.quick else 2)
    xb = x[:b16]
    with torch.inference_mode(), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
        ts16 = best_times({"bf16": lambda: run("bf16", model, xb)}, reps if supported else 1, args.device,
                          warmup=1 if supported else 0)["bf16"]
    f16 = feats["bf16"].float()
    cos = torch.nn.functional.cosine_similarity(f16, f32[:b16], dim=1)
    wl16 = {**wl, "batch": b16, "shapes": f"({b16},3,224,224)", "dtype": "bfloat16 autocast",
            "bf16_supported": supported}
    note = {} if supported else {"note": "bf16 not supported on this CPU (emulated, slower than fp32)"}
    out["vit_img_s_bf16"] = entry(b16 / min(ts16), "images/s", wl16, **timing_stats(ts16), **note)
    out["vit_bf16_cosine_vs_fp32"] = entry(cos.min().item(), "cosine", wl16, mean=cos.mean().item())
    return out


def step_flops(model, x1, x2, beta):
    """FLOPs of one forward + backward (torch.utils.flop_counter: 2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode
    probe = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        probe.pair_loss(x1, x2, beta)["loss"].backward()
    return counter.get_total_flops()


# --- 3. A sweep of N FeatureVAEs: sequential vs stacked weights --------------------------------------------------

def fit_rate(args, make, bank, n_models, steps, stack):
    """Model-steps/s of train.fit (one model after another) or train.fit_stacked on a sweep of n_models (seeds ×
    β ∈ {1, 2}) drawing pairs of `bank`; the clock starts once the models are built."""
    pairs = lambda seed, step: np.random.default_rng((seed, step)).integers(0, len(bank), (2, 64))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(n_models):
            torch.manual_seed(i // 2)
            runs.append(train.Run(make().to(args.device), i // 2, 1.0 + i % 2, os.path.join(tmp, str(i)), {}))
        t0 = time.perf_counter()
        (train.fit_stacked if stack else train.fit)(runs, bank, pairs, steps=steps, log_every=steps,
                                                    checkpoint_every_s=1e9, label="bench")
        sync(args.device)
        return n_models * steps / (time.perf_counter() - t0)


def bench_sweep(args):
    """A sweep of FeatureVAEs (on a bank of Φ-like vectors) and of ConvVAEs (on a bank of images), one model
    after another (train.fit) vs stacked (train.fit_stacked, --parallel-models)."""
    cuda = torch.device(args.device).type == "cuda"
    n_models = 20 if (cuda or not args.quick) else 4
    steps = (200 if cuda else 30) if not args.quick else (50 if cuda else 10)
    pairs, g = 64, torch.Generator().manual_seed(0)
    f_batches = torch.randn(4096, 768, generator=g).to(args.device)
    c_batches = torch.randint(0, 256, (512, 3, 64, 64), generator=g, dtype=torch.uint8).to(args.device)
    feat, conv = (lambda: drl.FeatureVAE()), (lambda: drl.ConvVAE())
    conv_models, conv_steps = (n_models, steps) if cuda else (min(n_models, 4), max(2, steps // 5))
    rates = {"seq": [], "vec": []}
    for _ in range(2 if args.quick else 3):  # interleaved repetitions, best of each
        rates["seq"].append(fit_rate(args, feat, f_batches, n_models, steps, stack=False))
        rates["vec"].append(fit_rate(args, feat, f_batches, n_models, steps, stack=True))
    conv_rates = {k: fit_rate(args, conv, c_batches, m, conv_steps, stack=m > 1)
                  for k, m in (("one", 1), ("vec", conv_models))}
    flops = step_flops(drl.FeatureVAE().to(args.device), f_batches[:pairs], f_batches[pairs:2 * pairs], 1.0)
    wl = workload(args, models=n_models, steps_per_model=steps, batch=f"{pairs} pairs",
                  model="FeatureVAE(768,512,10)", dtype="float32",
                  step="Ada-GVAE loss + backward + clip 1.0 + Adam",
                  includes="the training loop: batch sampling, step, logging, the final checkpoint")
    wl_c = {**wl, "models": conv_models, "steps_per_model": conv_steps, "model": "ConvVAE(10)"}
    best = max(rates["vec"])
    out = {"sweep_models_steps_s_sequential": entry(max(rates["seq"]), "model-steps/s",
                                                    {**wl, "how": "train.fit, one model after another"},
                                                    all=rates["seq"]),
           "sweep_models_steps_s_vectorised": entry(best, "model-steps/s",
                                                    {**wl, "how": "train.fit_stacked: torch.func + vmap"},
                                                    all=rates["vec"]),
           "sweep_gflops": entry(best * flops / 1e9, "GFLOP/s", {**wl, "flops_per_step": flops,
                                                                "how": "the stacked rate x flop_counter"}),
           "conv_vae_fit_steps_s": entry(conv_rates["one"], "steps/s", {**wl_c, "models": 1, "how": "train.fit"}),
           "conv_sweep_models_steps_s_vectorised": entry(conv_rates["vec"], "model-steps/s",
                                                         {**wl_c, "how": "train.fit_stacked"})}
    # the paper's source sweep at these rates: 20 models x 400k steps (extrapolated, not run)
    for key, rate in (("paper_sweep_minutes_features", max(best, max(rates["seq"]))),
                      ("paper_sweep_minutes_pixels", max(conv_rates.values()))):
        out[key] = entry(20 * 400_000 / rate / 60, "minutes", {**(wl if "features" in key else wl_c),
                         "how": "20 x 400k model-steps / the best rate above, one after another or stacked "
                                "(extrapolated, not run)"})
    return out


# --- 4. DCI + MIG + OMES of one model (Φ path: features cached, so encoding is a lookup + the VAE encoder) -------

def bench_metrics(args):
    """The feature bank stands in for cached Φ: a random linear image of the one-hot factors plus noise, so the
    codes carry the factors as a trained model's would; the random encoder's last layer is rescaled so that
    μ has unit spread (a fresh encoder's μ is nearly constant and every dim would count as inactive)."""
    g = torch.Generator().manual_seed(0)
    sizes = data.FACTOR_SIZES
    factors = torch.as_tensor(data.TextureDSprites().index_to_factors(np.arange(int(np.prod(sizes)))))
    onehot = torch.cat([F.one_hot(factors[:, k], s).float() for k, s in enumerate(sizes)], dim=1)
    bank = onehot @ torch.randn(sum(sizes), 768, generator=g) + 0.5 * torch.randn(len(onehot), 768, generator=g)
    torch.manual_seed(0)
    model = drl.FeatureVAE().eval()
    with torch.no_grad():
        last = model.encoder[-1]
        spread = model.representation(bank[:2000]).std(0)
        last.weight[:10] /= spread[:, None]
        last.bias[:10] /= spread

    kw = dict(n_train=1000, n_test=500) if args.quick else {}
    t0 = time.perf_counter()
    z_grid = np.concatenate([model.representation(bank[i:i + 1000]).numpy() for i in range(0, len(bank), 1000)])
    scores = metrics.disentanglement_scores(z_grid, sizes, seed=0, **kw)
    dt = time.perf_counter() - t0
    wl = workload(args, model="FeatureVAE(768,512,10), random weights, synthetic feature bank (25200,768)",
                  n_train=scores["n_train"], n_test=scores["n_test"], omes_pairs=scores["omes"]["pairs"],
                  dtype="float64 codes", device="cpu (scikit-learn)",
                  defaults=not args.quick)
    return {"metrics_s": entry(dt, "s", wl)}


# --- 5. Peak memory of streaming the source features to the memmap ---------------------------------------------

def peak_rss_mb():
    """Peak resident memory of this process in MB (VmHWM on Linux, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2 ** 20)


def bench_extract(args):
    """Φ of Texture-dSprites streamed into the memmap cache; the peak memory is this process's, so run
    `--only extract` alone for a clean figure."""
    cuda = torch.device(args.device).type == "cuda"
    source = data.TextureDSprites()
    if args.quick:  # the streaming pipeline (render, preprocess, memmap) with a cheap model, 1/6 of the grid
        config, what, n = dict(embed_dim=64, depth=1, num_heads=2), "small random-weight ViT (dim 64, depth 1)", 4096
    else:  # ViT-B on all 25,200 images takes hours on a 2-core CPU
        config, what, n = dict(drl.VIT_B16_CONFIG), "ViT-B/16 (random weights)", len(source) if cuda else 256
    torch.manual_seed(0)
    model = drl.VisionTransformer(**config).to(args.device).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        drl.extract_features(model, source.images, n, os.path.join(tmp, "phi.npy"), batch_size=64, device=args.device)
        seconds = time.perf_counter() - t0
    wl = workload(args, images=n, batch=64, model=what, dtype="float32", shapes=f"memmap ({n}, {model.embed_dim})",
                  source="Texture-dSprites rendered on the fly, 64 -> 224")
    return {"extract_peak_rss_mb": entry(peak_rss_mb(), "MB", wl, seconds=seconds, images_s=n / seconds)}


# --- Table, JSON, main -------------------------------------------------------------------------------------------

def verdict(key, results):
    """(ratio text, PASS/FAIL/info text) for a key with a target."""
    ref, op, bound, what = TARGETS[key]
    v = results[key]["value"]
    if key == "vit_img_s_bf16" and not results[key]["workload"].get("bf16_supported", True):
        return "", "n/a: bf16 not supported on this " + ("GPU" if "cuda" in str(results[key]["workload"]["device"])
                                                         else "CPU")
    if v is None or (ref is not None and (ref not in results or results[ref]["value"] in (None, 0))):
        return "", "n/a"
    x = v / results[ref]["value"] if ref else v
    text = f"{what} = {x:.3g}"
    if op is None:
        return text, "info"
    ok = {">=": x >= bound, "<=": x <= bound, "<": x < bound}[op]
    return text, f"{'PASS' if ok else 'FAIL'} ({op} {bound:g})"


def short(wl):
    keep = ("batch", "shapes", "models", "images", "model", "dtype", "threads", "device")
    return ", ".join(f"{k}={wl[k]}" for k in keep if k in wl)


def table(results):
    lines = [f"{'key':34} {'value':>12} {'unit':14} {'ratio / target':42} workload"]
    for k, e in results.items():
        v = e["value"]
        vs = "null" if v is None else (f"{v:.3e}" if 0 < abs(v) < 1e-2 else f"{v:.4g}")
        ratio, ok = verdict(k, results) if k in TARGETS else ("", "")
        lines.append(f"{k:34} {vs:>12} {e['unit']:14} {(ratio + ' ' + ok).strip():42} {short(e['workload'])}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small workloads (< 3 min on 2 cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="bench.json", help="JSON output (written atomically)")
    p.add_argument("--dino-weights", default=None, help="DINO ViT-B/16 weights (else hub cache, else random)")
    p.add_argument("--only", default=None, help="comma list of stages: matmul,vit,sweep,metrics,"
                                                "extract")
    args = p.parse_args(argv)
    try:
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available; use --device cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        stages = {"matmul": lambda: bench_matmul(args), "vit": lambda: bench_vit(args, data.TextureDSprites()),
                  "sweep": lambda: bench_sweep(args), "metrics": lambda: bench_metrics(args),
                  "extract": lambda: bench_extract(args)}
        only = args.only.split(",") if args.only else list(stages)
        unknown = [s for s in only if s not in stages]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} in --only; choose from {','.join(stages)}")
        results, t_start = {}, time.perf_counter()
        for name in only:
            t0 = time.perf_counter()
            results.update(stages[name]())
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
                   "cpu_bf16_supported": bf16_supported("cpu"), "quick": args.quick,
                   "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
                   "seconds": time.perf_counter() - t_start,
                   "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        for k, e in results.items():
            if k in TARGETS:
                e["target"] = verdict(k, results)[1]
        print(table(results))
        drl.write_text(args.out, json.dumps({"machine": machine, **results}, indent=1))
        print(f"wrote {args.out} ({machine['seconds']:.0f} s)")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
