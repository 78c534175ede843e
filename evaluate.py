"""Evaluate the transfer to a target: the paper's Tables II, III and V, interpretability and figures.

    python evaluate.py --target synthetic-cells --quick
    python evaluate.py --target lensless --holdout-class arcella
    python evaluate.py --explicitness [--backbone resnet152 densenet201 vgg19 swin_b vit_l_16 dino] [--quick]

Runs what is missing first (source models, features, finetuning; announced), then scores every model
(seed × β) before and after finetuning and writes, under --out/eval/<target>[-without-<class>]/<models>/:
report.md, results.json (every number, per model) and figures/*.png. --explicitness writes the paper's
Table IV (how well each Texture-dSprites factor can be classified from each backbone's frozen Φ) under
--out/explicitness/<quick|full>/.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings

from sklearn.utils.parallel import Parallel, delayed

import numpy as np
import torch
from matplotlib.figure import Figure  # figures without pyplot's global state or a backend to choose

import data
import drl
import metrics
import se2
import train
from train import say

STATES = ("before", "after")  # source weights as transferred; after β-VAE finetuning on the target
EVAL_VERSION = 2  # part of every evaluation cache key: bump it whenever what is computed changes


def cached(cfg, parts, compute=None):
    """(compute() once per key, the key): the result's JSON is kept in out/eval-cache/<key>.json, the key made of
    `parts` (everything that changes the result) and EVAL_VERSION; the result is always the JSON round trip, so a
    cached run writes the same report as the run that computed it. Without `compute`: the cached result or None."""
    key = train.cache_key(**dict(parts, version=EVAL_VERSION))
    path = os.path.join(cfg.out, "eval-cache", f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), key
    if compute is None:
        return None, key
    text = json.dumps(compute(), default=json_default)
    drl.write_text(path, text)
    return json.loads(text), key


def json_default(o):
    return o.tolist()  # NumPy arrays and scalars


def timed(what, fn):
    """fn(), then one line saying what it was and how long it took."""
    t0 = time.time()
    out = fn()
    say(f"evaluate: {what}: {time.time() - t0:.1f} s")
    return out


def encode(model, x, device, batch=1024):
    """Deterministic codes (μ, or μ_ISO + angles for SE2VAE) of a stored input tensor, in chunks: each chunk
    goes to the device in a non-blocking copy and its codes come back the same way (drl.to_host)."""
    with torch.no_grad():
        codes = (model.representation(drl.to_model(drl.to_device(x[i:i + batch], device)))
                 for i in range(0, len(x), batch))
        return np.concatenate(list(drl.to_host(codes))).astype(np.float64)


def _attempt(label, name, fn):
    """fn(), or None with a warning naming the model: a score that cannot be computed for one model (e.g.
    OMES of a collapsed model whose dims are all inactive) never hides the others."""
    try:
        return fn()
    except ValueError as e:
        warnings.warn(f"{label}: {name} not computed ({e}); recorded as null")
        return None


def score(label, z_grid, dis, z_train, z_test, ctx):
    """Every number of one model in one state, from its codes (this runs in a worker process): DCI, MIG and
    OMES on Texture-dSprites (Table III; `dis` when cached), then the target's (target_scores). Returns
    (dis, target scores, seconds, the warnings raised)."""
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:  # said again by the main process
        warnings.simplefilter("always")
        if dis is None:
            dis = _attempt(label, "DCI/MIG/OMES", lambda: metrics.disentanglement_scores(
                z_grid, ctx["factor_sizes"], n_train=ctx["n_train"], n_test=ctx["n_test"], seed=0, n_jobs=1))
        scores = target_scores(dis, z_train, z_test, ctx, label)
    return dis, scores, time.time() - t0, [str(w.message) for w in caught]


def target_scores(dis, z_train, z_test, ctx, label):
    """Every target number of one model: downstream accuracy, Gini importance per dim (dims named after
    the source factor they encode best), clustering, open set, correlations with handcrafted features.
    ctx: the labels, the known (not held-out) images, the held-out class and the handcrafted features."""
    known, (y_train, y_test), held = ctx["known"], ctx["labels"], ctx["held"]
    r = {"dim_names": (metrics.name_dims(dis["dci"]["importance"], data.FACTOR_NAMES) if dis
                       else [f"dim{d}" for d in range(z_train.shape[1])])}
    # Inactive dims (std < 0.05 on the train split) are removed before the classifiers (README, "Where we differ").
    pruned = _attempt(label, "pruning", lambda: metrics.prune_inactive(z_train[known["train"]], z_test,
                                                                       threshold=0.05))
    r["active_dims"] = [int(d) for d in pruned[0]] if pruned else []
    r["gini_importance"] = np.zeros(z_train.shape[1])
    r["downstream"] = r["clustering"] = r["open_set"] = None
    if pruned:
        kept, zk_train, zk_test = pruned
        r["downstream"] = down = metrics.downstream_accuracy(
            zk_train, y_train[known["train"]], zk_test[known["test"]], y_test[known["test"]], seed=0)
        r["gini_importance"][kept] = down.pop("gbt_importance")
        r["clustering"] = _attempt(label, "clustering", lambda: metrics.clustering_scores(
            zk_test[known["test"]], y_test[known["test"]], seed=0))
        if held is not None:
            r["open_set"] = _attempt(label, "open set", lambda: metrics.open_set(
                zk_train, y_train[known["train"]], zk_test, y_test, held, k=5, quantile=0.95, seed=0))
    rows, feats = ctx["handcrafted"]
    if len(rows) >= 3:
        r["correlation"] = {"n_images": len(rows)}
        for f, h in CORRELATED:
            if f in r["dim_names"]:
                c = metrics.correlations(z_test[rows][:, [r["dim_names"].index(f)]], {h: feats[h]})[0][h]
                # the sign of a latent axis is arbitrary (z and -z are the same code): compare |r| across models
                r["correlation"][f"{f}:{h}"] = dict(c, abs_r=abs(c["r"]), dim=r["dim_names"].index(f))
    r["_z_test"] = z_test  # for the figures only; evaluate_all drops it before results.json
    return r


class Inputs:
    """What scoring needs, built on first use (a fully cached evaluation builds none of it)."""

    def __init__(self, cfg, res, target, source_checkpoint):
        self.cfg, self.res, self.target = cfg, res, target
        # Φ of the target is standardised with the source's statistics (none for pixel models)
        self.feature_stats = {k: v for k, v in source_checkpoint.items() if k in ("feature_mean", "feature_std")}
        self.held = target.classes.index(cfg.holdout_class) if cfg.holdout_class else None
        self.known = {"train": target.train.labels != self.held, "test": target.test.labels != self.held}

    @functools.cached_property
    def source_digest(self):
        return data.TextureDSprites(textures=self.cfg.textures, dsprites=self.cfg.dsprites).digest

    @functools.cached_property
    def source(self):
        return train.SourceInputs(self.cfg, self.res)

    @functools.cached_property
    def x(self):
        """The model inputs of the target's train and test images."""
        return [train.target_inputs(self.cfg, self.res, getattr(self.target, part), self.feature_stats,
                                    f"{self.cfg.target}-{part}") for part in ("train", "test")]

    @functools.cached_property
    def handcrafted(self):
        """(rows, features): the test images that have a mask and their handcrafted features (mask area,
        mean R/G/B inside, solidity)."""
        rows, test = self.target.test.with_masks, self.target.test
        return rows, data.handcrafted_features(test.images(rows, data.HANDCRAFTED_SIZE),
                                                test.masks(rows, data.HANDCRAFTED_SIZE))

    @functools.cached_property
    def ctx(self):
        """What scoring needs besides a model's codes (small: it goes to the worker processes)."""
        return {"known": self.known, "labels": (self.target.train.labels, self.target.test.labels), "held": self.held,
                "handcrafted": self.handcrafted if self.target.test.has_masks else ([], {}),
                "factor_sizes": data.FACTOR_SIZES, "n_train": self.cfg.n_train, "n_test": self.cfg.n_test}


# Latent factor ↔ handcrafted feature pairs of the paper's Fig. 6
CORRELATED = (("scale", "area"), ("colour", "mean_r"), ("shape", "solidity"))


def raw_baseline(inputs):
    """Table V: the same classifiers on the raw input, no VAE: Φ (768-d), or pixels average-pooled to
    8×8×3 = 192 values (the GBT's time grows with the width: 64×64×3 would take hours on a CPU)."""
    def flat(x):
        x = drl.to_model(x)
        if x.dim() == 4:
            x = torch.nn.functional.avg_pool2d(x, 8)
        return x.flatten(1).numpy().astype(np.float64)
    target, known = inputs.target, inputs.known
    a, b = flat(inputs.x[0])[known["train"]], flat(inputs.x[1])[known["test"]]
    result = metrics.downstream_accuracy(a, target.train.labels[known["train"]], b,
                                         target.test.labels[known["test"]], seed=0)
    result.pop("gbt_importance")
    return result


def summarise(per_model):
    """mean ± SD over models of every scalar, per state."""
    def scalars(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from scalars(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}{k}", float(v)
    out = {}
    for state in STATES:
        table = {}
        for m in per_model:
            for k, v in scalars(m[state]):
                table.setdefault(k, []).append(v)
        out[state] = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "n": len(v)} for k, v in table.items()}
    out["n_models"] = len(per_model)
    return out


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_config_args(p, several=("backbone",))
    p.add_argument("--explicitness", action="store_true", help="Table IV: classify each Texture-dSprites factor "
                   "from the frozen features of every --backbone (default: the paper's " +
                   ", ".join(PAPER_BACKBONES) + f"); --quick: {QUICK_EXPLICITNESS_IMAGES} images")
    return p


def config_from_args(args):
    """(Config, the --backbone names): several names are for --explicitness only."""
    backbones = args.backbone
    args.backbone = backbones[0] if backbones and len(backbones) == 1 else None
    return train.config_from_args(args), backbones


def main(argv=None):
    args = parser().parse_args(argv)
    with train.one_line_errors():
        cfg, backbones = config_from_args(args)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("evaluate.py runs as one process; run it without torchrun (train.py under torchrun "
                             "trains the models, then evaluate.py scores them all)")
        if args.explicitness:
            return explicitness_main(cfg, backbones)
        if backbones and len(backbones) > 1:
            raise ValueError(f"--backbone takes one name here, got {len(backbones)} (several only with "
                             f"--explicitness)")
        if args.check_data:
            return train.check_data(cfg)
        t0 = time.time()
        cfg, target, split_file = train.load_target(cfg)
        res = train.resolve(cfg)
        train.use_device(res)
        say(f"evaluate: {cfg.target}, backbone {res.backbone}, {len(cfg.seeds) * len(cfg.betas)} model(s)")
        pairs = train.finetune(cfg, res, target)
        folder = os.path.join(cfg.out, "eval", cfg.target + (f"-without-{cfg.holdout_class}" if cfg.holdout_class
                                                             else ""), train.model_tag(cfg, res) + f"-{cfg.epochs}ep")
        results = evaluate_all(cfg, res, target, pairs, folder)
        results["data"]["split_file"] = split_file
        write_results(folder, results, report, t0)


def write_results(folder, results, render, t0):
    """folder/results.json (every number) and folder/report.md, render(results), made from the same dict."""
    results["seconds"] = round(time.time() - t0, 1)
    drl.write_text(os.path.join(folder, "results.json"), json.dumps(results, indent=1, default=json_default))
    drl.write_text(os.path.join(folder, "report.md"), render(results))
    say(f"done in {time.time() - t0:.0f} s: {os.path.join(folder, 'report.md')}")


def evaluate_all(cfg, res, target, pairs, folder):
    """Every model before and after finetuning, the raw-input baseline and the figures: the results dict.
    Each part is cached (see `cached`): a rerun computes only what a changed setting changes."""
    inputs = Inputs(cfg, res, target, drl.load_checkpoint(pairs[0][0]))
    per_model = score_models(cfg, res, target, pairs, inputs)
    baseline, _ = cached(cfg, dict(part="raw", target=target.digest, backbone=res.backbone, holdout=cfg.holdout_class,
                                   weights=res.weights_digest),
                         lambda: timed("raw-input baseline (Table V)", lambda: raw_baseline(inputs)))
    shown = median_model(per_model)
    z = np.asarray(per_model[shown]["after"]["_z_test"])  # the figures show this model's test codes
    for m in per_model:
        for state in STATES:
            del m[state]["_z_test"]
    key = dict(part="figures", models=[{s: m[s] for s in STATES} for m in per_model],
               shown=train.file_digest(pairs[shown][1]), z=hashlib.sha256(z.tobytes()).hexdigest(),
               target=target.digest, source=inputs.source_digest, holdout=cfg.holdout_class, columns=GALLERY_COLUMNS)

    def draw():
        return timed("figures and galleries",
                     lambda: make_figures(folder, res, inputs, per_model, shown, pairs[shown][1], z))
    figures, _ = cached(cfg, dict(key, folder=folder), draw)  # the figures' paths and the Fig. 3 numbers
    if not all(os.path.exists(os.path.join(folder, v)) for v in figures.values() if str(v).endswith(".png")):
        figures = json.loads(json.dumps(draw(), default=json_default))  # a figure was deleted: redraw
    feature_dim = len(inputs.feature_stats["feature_mean"]) if inputs.feature_stats else None
    return {"target": cfg.target, "backbone": res.backbone, "feature_dim": feature_dim,
            "arch": train.vae_arch(cfg, res), "method": cfg.method,
            "classes": target.classes, "holdout_class": cfg.holdout_class, "quick": cfg.quick,
            "data": {"layout": target.layout, "folder": target.path, "split": target.split_kind},
            "protocol": {k: getattr(cfg, k) for k in ("seeds", "betas", "steps", "epochs", "batch_size", "lr",
                                                       "latent_dim", "n_train", "n_test")},
            "n_train_images": len(target.train), "n_test_images": len(target.test),
            "models": per_model, "summary": summarise(per_model), "raw_input_baseline": baseline,
            "figures": figures}


def score_models(cfg, res, target, pairs, inputs):
    """Each (source, finetuned) pair scored before and after finetuning; what is cached is read back. For the
    rest, each model encodes its inputs on the device here, then the scikit-learn fits of every model and state
    run spread over the CPU's cores (one joblib level; each job's own fits run one at a time): they are the cost."""
    per_model, jobs = [], []
    for src_path, ft_path in pairs:
        row = {}
        for state, path in zip(STATES, (src_path, ft_path)):
            conf = drl.load_checkpoint(path)["config"]
            label = f"{state} finetuning beta={conf['beta']:g} seed={conf['seed']}"
            checkpoint = train.file_digest(path)
            dis_parts = dict(part="source", checkpoint=checkpoint, source=inputs.source_digest, n_train=cfg.n_train,
                             n_test=cfg.n_test)
            dis, dis_key = cached(cfg, dis_parts)
            tgt_parts = dict(part="target", checkpoint=checkpoint, source=dis_key, target=target.digest,
                             holdout=cfg.holdout_class)
            row[state], _ = cached(cfg, tgt_parts)
            if row[state] is None:
                model = drl.load_model(path, res.device)[0]
                z_grid = encode(model, inputs.source.x, res.device, batch=1000) if dis is None else None  # grid order
                codes = [encode(model, x, res.device) for x in inputs.x]
                jobs.append((row, state, dis_parts, tgt_parts, delayed(score)(label, z_grid, dis, *codes, inputs.ctx)))
            else:
                row[state]["disentanglement"] = dis
        row["beta"], row["seed"] = conf["beta"], conf["seed"]
        per_model.append(row)
    if jobs:
        n_jobs = min(len(jobs), os.cpu_count())
        say(f"evaluate: scoring {len(jobs)} model state(s) on {n_jobs} core(s)")
        for (row, state, dis_parts, tgt_parts, _), (dis, tgt, seconds, said) in zip(
                jobs, Parallel(n_jobs=n_jobs)(job for *_, job in jobs)):
            for message in said:
                warnings.warn(message)
            dis, _ = cached(cfg, dis_parts, lambda: dis)
            row[state], _ = cached(cfg, tgt_parts, lambda: tgt)
            row[state]["disentanglement"] = dis
            say(f"evaluate: {state} finetuning beta={row['beta']:g} seed={row['seed']}: scored in {seconds:.0f} s")
    return per_model


# --- Explicitness of frozen backbones on Texture-dSprites (paper Table IV) ---------------------------------------

PAPER_BACKBONES = ("resnet152", "densenet201", "vgg19", "swin_b", "vit_l_16", "dino")
QUICK_EXPLICITNESS_IMAGES = 1000  # of 25,200: 800 train / 200 test
QUICK_GBT_MAX_FEATURES = "sqrt"  # quick: each GBT split looks at sqrt(dim Φ) random features (~50x faster)


def explicitness_main(cfg, backbones):
    """Table IV for `backbones` (None: the paper's, those whose weights are not here are skipped, said so)."""
    named = bool(backbones)
    backbones = list(backbones or PAPER_BACKBONES)
    if "pixels" in backbones or "auto" in backbones:
        raise ValueError("--explicitness compares frozen feature extractors: name dino or torchvision models, "
                         "not pixels or auto")
    for name in backbones:
        train.Config(backbone=name)  # an unknown name fails here, before any work
    others = [b for b in backbones if b != "dino"]
    if cfg.backbone_weights and len(others) > 1:
        raise ValueError(f"--backbone-weights is one file but {len(others)} torchvision backbones are named; put "
                         f"each one's weights in the torch hub cache ({torch.hub.get_dir()}/checkpoints/)")
    t0, resolved = time.time(), []
    for name in backbones:
        sub = dataclasses.replace(cfg, backbone=name, backbone_weights=None if name == "dino" and others
                                  else cfg.backbone_weights)
        try:
            resolved.append(train.resolve(sub))
        except FileNotFoundError as e:
            if named:
                raise
            say(f"explicitness: skipping {name}: {e}")
    if not resolved:
        raise ValueError("--explicitness: no backbone has its weights here; name them with --backbone and "
                         "give --backbone-weights / --dino-weights")
    train.use_device(resolved[0])
    results = explicitness(cfg, resolved)
    folder = os.path.join(cfg.out, "explicitness", "quick" if cfg.quick else "full")
    write_results(folder, results, explicitness_report, t0)


def explicitness(cfg, resolved):
    """Per resolved backbone: Φ of a fixed split of Texture-dSprites (data.explicitness_split) and the test
    accuracy of GBT and MLP per factor (metrics.explicitness), cached; plus the chance row, 1/size."""
    dataset = data.TextureDSprites(textures=cfg.textures, dsprites=cfg.dsprites)
    n = QUICK_EXPLICITNESS_IMAGES if cfg.quick else len(dataset)
    tr, te = data.explicitness_split(len(dataset), n, seed=0)
    chosen = np.sort(np.concatenate([tr, te]))
    # the whole dataset shares its feature cache with the source stage
    name, digest = (("texture-dsprites", dataset.digest) if n == len(dataset) else
                    (f"texture-dsprites-{n}", train.cache_key(dataset=dataset.digest, images=chosen)))
    max_features = QUICK_GBT_MAX_FEATURES if cfg.quick else None
    rows = []
    f_tr, f_te = dataset.index_to_factors(tr), dataset.index_to_factors(te)
    for res in resolved:
        phi = np.asarray(train.features(cfg, res, name, digest, n, lambda i: dataset.images(chosen[i])))
        a, b = phi[np.searchsorted(chosen, tr)], phi[np.searchsorted(chosen, te)]
        key = dict(part="explicitness", backbone=res.backbone, weights=res.weights_digest,
                   precision=res.precision, source=dataset.digest, train=tr, test=te, gbt_max_features=max_features)
        scores, _ = cached(cfg, key, lambda: timed(
            f"{res.backbone}: GBT + MLP per factor on {len(tr)} + {len(te)} images", lambda: metrics.explicitness(
                a, f_tr, b, f_te, data.FACTOR_NAMES, seed=0, gbt_max_features=max_features)))
        rows.append({"backbone": res.backbone, "weights": res.weights, "feature_dim": int(phi.shape[1]),
                     "scores": scores})
        say(f"explicitness: {res.backbone}: GBT all {100 * scores['all']['gbt']:.2f} %, MLP all "
            f"{100 * scores['all']['mlp']:.2f} %")
    chance = {f: 1 / s for f, s in zip(data.FACTOR_NAMES, data.FACTOR_SIZES)}
    chance["all"] = float(np.mean(list(chance.values())))
    return {"factors": list(data.FACTOR_NAMES), "factor_sizes": list(data.FACTOR_SIZES), "quick": cfg.quick,
            "n_train_images": len(tr), "n_test_images": len(te), "precision": resolved[0].precision, "chance": chance,
            "gbt_max_features": max_features, "backbones": rows}


def explicitness_report(r):
    cols = r["factors"] + ["all"]
    subset = " — **quick subset**" if r["quick"] else ""
    gbt = (f" (quick: each GBT split considers max_features={r['gbt_max_features']!r} of Φ's dims)"
           if r["gbt_max_features"] else "")
    lines = ["# Explicitness of frozen backbones on Texture-dSprites (paper Table IV)", "",
             f"Test accuracy (%) of classifiers trained on the frozen features Φ to predict each factor: "
             f"{r['n_train_images']} train / {r['n_test_images']} test images of Texture-dSprites{subset}, split "
             f"80/20 per orientation value (seed 0). GBT and MLP are those of Table II{gbt}. The objects are "
             "centred, so the paper's PosX and PosY columns are absent and All is the mean over the five factors; "
             "chance is 1/size.", "",
             "| backbone | Φ dim | classifier | " + " | ".join(cols) + " |",
             "| --- | --- | --- |" + " --- |" * len(cols),
             "| chance | | | " + " | ".join(f"{100 * r['chance'][c]:.2f}" for c in cols) + " |"]
    for row in r["backbones"]:
        for clf in ("gbt", "mlp"):
            lines.append(f"| {row['backbone']} | {row['feature_dim']} | {clf.upper()} | "
                         + " | ".join(f"{100 * row['scores'][c][clf]:.2f}" for c in cols) + " |")
    lines += ["", "Weights: " + "; ".join(f"{row['backbone']} `{row['weights']}`" for row in r["backbones"]) + ".",
              "", f"Every number is in `results.json`. Run time {r['seconds']} s.", ""]
    return "\n".join(lines)


# --- Report (every number comes from the results dict, so report.md and results.json always agree) ---------------

def num(summary, state, key, scale=1, digits=3):
    """mean ± SD of one summary entry; '(n=k)' when only k of the models have the number."""
    s = summary[state].get(key)
    if s is None:
        return "n/a"
    partial = f" (n={s['n']})" if s["n"] < summary["n_models"] else ""
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['sd']:.{digits}f}{partial}"


pct = functools.partial(num, scale=100, digits=2)  # a percentage


def _table(s, columns, fmt=pct):
    """A Markdown table of summary keys ({column: key}), one row per state (finetuned no / yes): mean ± SD."""
    return (["| finetuned | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)] +
            [f"| {mark} | " + " | ".join(fmt(s, state, k) for k in columns.values()) + " |"
             for state, mark in zip(STATES, ("no", "yes"))])


def report(results):
    s, p, d = results["summary"], results["protocol"], "disentanglement."
    lines = [f"# {results['target']}: transfer of a disentangled representation", "",
             f"Backbone **{results['backbone']}** ({results['arch']} VAE, source method {results['method']}); "
             f"{len(results['models'])} model(s) (seeds {p['seeds']}, β {p['betas']}), {p['steps']} source steps, "
             f"{p['epochs']} finetuning epochs" + (" — **quick run**" if results["quick"] else "")
             + f". Target: {results['n_train_images']} train / {results['n_test_images']} test images, classes: "
             + ", ".join(results["classes"]) + f" ({results['data']['layout']}; split: {results['data']['split']})."
             + " Values are mean ± SD over models.", "",
             "## Table II — downstream accuracy (%) on the disentangled representation", "",
             *_table(s, {"GBT": "downstream.gbt", "MLP": "downstream.mlp", "GBT balanced": "downstream.gbt_balanced",
                         "MLP balanced": "downstream.mlp_balanced"})]
    lines += _convergence(results)
    b = results["raw_input_baseline"]
    raw = (f"{results['backbone']} features Φ ({results['feature_dim']}-d)" if results["backbone"] != "pixels"
           else "pixels average-pooled to 8×8 RGB (192 values)")
    lines += ["", "## Table V — the same classifiers on the raw input (no disentanglement)", "",
              f"Input: {raw}. GBT {100 * b['gbt']:.2f} %, MLP {100 * b['mlp']:.2f} %.", "",
              "## Table III — disentanglement on Texture-dSprites (%), before/after finetuning", "",
              *_table(s, {"DCI D": d + "dci.disentanglement", "DCI C": d + "dci.completeness",
                          "DCI I (test)": d + "dci.informativeness_test", "MIG": d + "mig", "OMES": d + "omes.omes"}),
              "", f"## Clustering (K-Means, k = {_kmeans_k(results)}: the classes present in the test split)", "",
              *_table(s, {"AMI": "clustering.ami", "silhouette": "clustering.silhouette"}, num)]
    return "\n".join(lines + _interpretability(results) + _open_set(results) + _figures(results) + [
        "", f"Every number above is in `results.json` (per model). Run time {results['seconds']} s.", ""])


FIGURE_HELP = {
    "fig3_importance": "the GBT's Gini importance summed over the dims named after each source factor (mean over models).",
    "fig4_top2_dims": "the test images on the two dims the GBT relies on most, coloured by class.",
    "fig6_correlation": "each dim named after a factor against the handcrafted feature it should track.",
    "fig7_open_set": "per dim, the held-out class's distance to the centroid of the class it is classified as.",
    "gallery_target": "one row per active dim: the test images nearest to 9 evenly spaced quantiles of the dim.",
    "gallery_source": "the same on Texture-dSprites, whose factors are known.",
    "traversals": "the test code nearest the mean, one dim swept over its mean ± 2 SD, decoded.",
}


def _figures(results):
    f = results["figures"]
    lines = ["", "## Figures", "", "Fig. 3 is the mean over models; every other figure shows one model, "
             f"{f['model_shown']}: the median of the {len(results['models'])} model(s) by GBT accuracy after "
             "finetuning (so the r in the titles of Fig. 6 is that model's, not the mean of the table above).", ""]
    lines += [f"- `{f[k]}`: {help}" for k, help in FIGURE_HELP.items() if k in f]
    if "traversals" not in f and results["backbone"] != "pixels":
        lines.append("- traversals: not drawn, since the decoder of a VAE on features Φ returns features, not images.")
    return lines


def _kmeans_k(results):
    ks = {m[s]["clustering"]["k"] for m in results["models"] for s in STATES if m[s].get("clustering")}
    return ", ".join(str(k) for k in sorted(ks)) or "n/a"


def _convergence(results):
    """A warning line under Table II for every state in which some MLP stopped at its iteration limit."""
    lines = []
    for state in STATES:
        stopped = [f"seed {m['seed']} β {m['beta']:g}" for m in results["models"]
                   if m[state].get("downstream") and not m[state]["downstream"]["mlp_converged"]]
        if stopped:
            lines.append(f"\n**Warning:** {len(stopped)} of {len(results['models'])} MLP(s) {state} finetuning "
                         f"stopped at the iteration limit without converging ({', '.join(stopped)}); their accuracy "
                         "may be low.")
    return lines


def _interpretability(results):
    s, order = results["summary"], results["figures"]["factor_order"]
    lines = ["", "## Interpretability", "",
             "Each latent dim is named after the source factor it encodes best (DCI importance on Texture-dSprites;"
             " a second dim of the same factor is `factor#2`). Gini importance of the GBT per factor, summed over"
             " its dims, mean over models:", "",
             *_table(results["figures"]["importance_by_factor"], {f: f for f in order},
                     lambda imp, state, f: f"{imp[state][f]:.3f}")]
    keys = sorted({k for m in results["models"] for k in m["after"].get("correlation") or {} if ":" in k})
    n_masked = max((m["after"].get("correlation") or {}).get("n_images", 0) for m in results["models"])
    if keys:
        lines += ["", "|Pearson r| between the latent dim named after a factor and a handcrafted feature of the "
                  f"{n_masked} of {results['n_test_images']} test images that have a mask (the sign of a latent "
                  "axis is arbitrary), mean ± SD over models:", "",
                  "| latent:feature | before | after |", "| --- | --- | --- |"]
        lines += [f"| {k} | {num(s, 'before', 'correlation.' + k + '.abs_r')} | "
                  f"{num(s, 'after', 'correlation.' + k + '.abs_r')} |" for k in keys]
    return lines


def _open_set(results):
    if not results["holdout_class"]:
        return []
    s = results["summary"]
    lines = ["", f"## Open set: held-out class {results['holdout_class']}", "",
             *_table(s, {"detection rate": "open_set.detection_rate", "false alarms": "open_set.false_alarm_rate",
                         "AUROC": "open_set.auroc"}, lambda s, st, k: (num if k.endswith("auroc") else pct)(s, st, k))]
    for state in STATES:
        counts = {}
        for m in results["models"]:
            for c, n in (m[state]["open_set"] or {"predicted_counts": {}})["predicted_counts"].items():
                counts[results["classes"][int(c)]] = counts.get(results["classes"][int(c)], 0) + n
        lines.append(f"\nHeld-out test samples classified by the GBT of the known classes ({state} finetuning, "
                     "summed over models): " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) + ".")
    return lines


# --- Figures (paper Figs. 3-7) -----------------------------------------------------------------------------------

def median_model(per_model):
    """The index of the model the figures show: the median by GBT accuracy after finetuning (the report's
    main score; of two middle ones the lower), so the pictures are of a typical model, not the luckiest."""
    score = [(m["after"].get("downstream") or {}).get("gbt", -1.0) for m in per_model]
    return sorted(range(len(score)), key=lambda i: (score[i], i))[(len(score) - 1) // 2]


GALLERY_COLUMNS = 9           # images per gallery row: the nearest to each of 9 evenly spaced quantiles of the dim
SOURCE_GALLERY_IMAGES = 2000  # the Texture-dSprites images (a fixed random subset) the source gallery picks from


def make_figures(folder, res, inputs, per_model, shown, path, z):
    """The figures as PNGs under folder/figures; returns their paths and the Fig. 3 numbers. Fig. 3 is the mean
    over models; the others show model `shown` (median_model; `path` its finetuned checkpoint, `z` its test
    codes; its seed and β in the titles): the two dims the GBT relies on most (Figs. 4-5), the
    handcrafted-feature correlations (Fig. 6), the held-out class (Fig. 7), and what each active dim means in
    images: galleries of the target's test images and of Texture-dSprites along every dim, traversals of a
    decoded code (pixel models; a Φ model's decoder returns features)."""
    target, cfg, fig_dir = inputs.target, inputs.cfg, os.path.join(folder, "figures")
    m = per_model[shown]["after"]
    who = f"seed {per_model[shown]['seed']}, β {per_model[shown]['beta']:g}, after finetuning"
    out = {"factor_order": list(data.FACTOR_NAMES), "model_shown": who,
           "importance_by_factor": {s: importance_by_factor(per_model, s, data.FACTOR_NAMES) for s in STATES}}
    out["fig3_importance"] = _fig_importance(fig_dir, out["importance_by_factor"])
    out["fig4_top2_dims"] = _fig_top2(fig_dir, m, z, target, who)
    pairs = [(f, h) for f, h in CORRELATED if f in m["dim_names"]]
    if target.test.has_masks and len(target.test.with_masks) >= 3 and pairs:
        out["fig6_correlation"] = _fig_correlation(fig_dir, m, z, *inputs.handcrafted, pairs, who)
    if cfg.holdout_class and m.get("open_set") and m["open_set"].get("centroid_distance_assigned") is not None:
        out["fig7_open_set"] = _fig_open_set(fig_dir, m, target, cfg.holdout_class, who)
    model = drl.load_model(path, res.device)[0]
    dims = m["active_dims"] or list(range(len(m["dim_names"])))
    names = [f"z{d} {m['dim_names'][d]}" for d in dims]
    src = inputs.source
    index, values = metrics.latent_gallery(z, dims, GALLERY_COLUMNS)
    out["gallery_dims"] = dims
    out["gallery_target"] = _fig_gallery(fig_dir, "gallery_target.png", target.test.images(index.ravel(), 64), values,
                                         names, f"{cfg.target} test images along each dim ({who})")
    pick = np.sort(np.random.default_rng(0).choice(len(src.dataset), SOURCE_GALLERY_IMAGES, replace=False))
    index, values = metrics.latent_gallery(encode(model, src.x[pick], res.device), dims, GALLERY_COLUMNS)
    out["gallery_source"] = _fig_gallery(fig_dir, "gallery_source.png", src.dataset.images(pick[index.ravel()]),
                                         values, names, f"Texture-dSprites along each dim ({who})")
    swept = traversal(model, z, dims)
    if swept is not None:
        out["traversals"] = _fig_gallery(fig_dir, "traversals.png", *swept, names,
                                         f"one test code, each dim swept over its mean ± 2 SD, decoded ({who})")
    return out


def importance_by_factor(per_model, state, factor_names):
    """Fig. 3: the GBT's Gini importance summed over the dims named after each factor, mean over models."""
    def per_factor(m):  # a dim is named "factor", or "factor#2" for the second dim of the same factor
        names = [name.split("#")[0] for name in m[state]["dim_names"]]
        return [sum(imp for n, imp in zip(names, m[state]["gini_importance"]) if n == f) for f in factor_names]
    sums = [per_factor(m) for m in per_model]
    return {f: float(np.mean([row[k] for row in sums])) for k, f in enumerate(factor_names)}


def _fig_importance(fig_dir, importance):
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, state in zip(axes, STATES):
        vals = importance[state]
        ax.bar(list(vals), list(vals.values()), color="tab:blue" if state == "before" else "tab:orange")
        ax.set_title(f"{state} finetuning (mean over models)")
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylabel("Gini importance (GBT)")
    return _save(fig, fig_dir, "fig3_importance.png")


def _fig_top2(fig_dir, m, z, target, who):
    """Figs. 4-5: the two dims the GBT relies on most, the test split coloured by class."""
    order = np.argsort(m["gini_importance"])[::-1][:2]
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for c, name in enumerate(target.classes):
        sel = target.test.labels == c
        ax.scatter(z[sel, order[0]], z[sel, order[1]], s=8, label=name, alpha=0.7)
    ax.set_xlabel(f"z{order[0]} ({m['dim_names'][order[0]]})")
    ax.set_ylabel(f"z{order[1]} ({m['dim_names'][order[1]]})")
    ax.set_title(f"two most important dims ({who})", fontsize=9)
    ax.legend(fontsize=7, markerscale=2)
    return _save(fig, fig_dir, "fig4_top2_dims.png")


def _fig_correlation(fig_dir, m, z, rows, feats, pairs, who):
    """Fig. 6: the latent scale / colour / shape dims against mask area / mean red / solidity."""
    fig = Figure(figsize=(4 * len(pairs), 3.5))
    axes = fig.subplots(1, len(pairs), squeeze=False)
    for ax, (f, h) in zip(axes[0], pairs):
        d = m["dim_names"].index(f)
        ax.scatter(feats[h], z[rows, d], s=6, alpha=0.6)
        r = m.get("correlation", {}).get(f"{f}:{h}", {}).get("r", float("nan"))
        ax.set_title(f"{f} dim z{d} vs {h}: r = {r:.2f}", fontsize=9)
        ax.set_xlabel(f"handcrafted {h}" + (" (mask pixels at 224x224)" if h == "area" else ""))
        ax.set_ylabel(f"z{d}")
    fig.suptitle(who, fontsize=9)
    return _save(fig, fig_dir, "fig6_correlation.png")


def _fig_open_set(fig_dir, m, target, holdout, who):
    """Fig. 7: per-dim mean |z − centroid| of the held-out class to the known class it is assigned to."""
    dist = m["open_set"]["centroid_distance_assigned"]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.bar(range(len(dist)), dist)
    ax.set_xticks(range(len(dist)), [m["dim_names"][d] for d in m["active_dims"]], rotation=30)
    ax.set_ylabel("mean |z - centroid|")
    assigned = target.classes[int(m["open_set"]["assigned"])]
    ax.set_title(f"held-out {holdout}: distance to the centroid of {assigned} ({who})", fontsize=8)
    return _save(fig, fig_dir, "fig7_open_set.png")


def traversal(model, z, dims, n=GALLERY_COLUMNS):
    """The classic latent traversal: the test code nearest the mean code, with dim d set to n values from its
    mean − 2 SD to its mean + 2 SD (over the test codes z), decoded. Returns (uint8 (len(dims)·n, H, W, 3)
    images, (len(dims), n) values), or None for a model on features Φ (its decoder returns features)."""
    if isinstance(model, drl.FeatureVAE):
        return None
    spread = z.std(0).clip(1e-12)
    codes = np.repeat(z[np.argmin((((z - z.mean(0)) / spread) ** 2).sum(1))][None], len(dims) * n, axis=0)
    values = z[:, dims].mean(0)[:, None] + np.linspace(-2, 2, n)[None] * spread[dims][:, None]
    for i, d in enumerate(dims):
        codes[i * n:(i + 1) * n, d] = values[i]
    x = decode_codes(model, torch.as_tensor(codes, dtype=torch.float32, device=next(model.parameters()).device))
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8), values


def decode_codes(model, codes):
    """Images in [0, 1], (n, C, H, W), decoded from representation codes: μ for the conv VAE; μ_ISO and then
    (cos θ, sin θ) of each angle for the SE(2,N) VAE. Both decoders return Bernoulli logits."""
    with torch.no_grad():
        if isinstance(model, se2.SE2VAE):
            k = model.n_iso
            angles = torch.atan2(codes[:, k + 1::2], codes[:, k::2]).remainder(2 * np.pi)
            return torch.sigmoid(model.decode(codes[:, :k], angles))
        return torch.sigmoid(model.decode(codes))


def _fig_gallery(fig_dir, name, images, values, row_names, title):
    """A grid of images (rows·cols, H, W, 3) with one row per dim, the value under each image."""
    rows, cols = values.shape
    h, w, gap = images.shape[1], images.shape[2], 12  # room under each image for its value
    canvas = np.full((rows * (h + gap), cols * (w + 2), 3), 255, np.uint8)
    for k, img in enumerate(images):
        i, j = divmod(k, cols)
        canvas[i * (h + gap):i * (h + gap) + h, j * (w + 2):j * (w + 2) + w] = img
    fig = Figure(figsize=(canvas.shape[1] / 110 + 1.4, canvas.shape[0] / 110 + 0.4))
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest")
    for i in range(rows):
        ax.text(-4, i * (h + gap) + h / 2, row_names[i], ha="right", va="center", fontsize=7)
        for j in range(cols):
            ax.text(j * (w + 2) + w / 2, i * (h + gap) + h + 1, f"{values[i, j]:.2f}", ha="center", va="top",
                    fontsize=5)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    return _save(fig, fig_dir, name)


def _save(fig, folder, name):
    fig.tight_layout()
    path = os.path.join(folder, name)
    with drl.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return os.path.relpath(path, os.path.dirname(folder))


if __name__ == "__main__":
    main()
