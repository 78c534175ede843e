"""Evaluate the transfer to a target: the paper's Tables II, III and V, interpretability and figures.

    python evaluate.py --target synthetic-cells --quick
    python evaluate.py --target lensless --holdout-class ARCELLA

Runs what is missing first (source models, features, finetuning; announced), then scores every model
(seed × β) before and after finetuning and writes, under --out/eval/<target>[-without-<class>]/<models>/:
report.md, results.json (every number, per model) and figures/*.png.
"""
import argparse
import json
import os
import time
import warnings

import numpy as np
import torch

import data
import drl
import metrics
import train
from train import say

STATES = ("before", "after")  # source weights as transferred; after β-VAE finetuning on the target


def encode(model, x, device, batch=1024):
    """Deterministic codes (μ, or μ_ISO + angles for SE2VAE) of a stored input tensor, in chunks."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model.representation(train.to_model(x[i:i + batch].to(device))).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def evaluate_model(model, src, x_train, x_test, target, known, args, label):
    """Every number of one model in one state (before/after finetuning).

    A score that cannot be computed for this model (e.g. OMES of a collapsed model whose dims are all
    inactive) is recorded as null with a warning naming the model, so one bad model never hides the others.
    """
    def attempt(name, fn):
        try:
            return fn()
        except ValueError as e:
            warnings.warn(f"{label}: {name} not computed ({e}); recorded as null")
            return None

    def encode_source(inputs):
        return encode(model, inputs, args.device)

    r = {"disentanglement": attempt("DCI/MIG/OMES", lambda: metrics.disentanglement_scores(
        encode_source, src, n_train=args.n_train, n_test=args.n_test, seed=0, dci_method=args.dci))}
    z_train, z_test = encode(model, x_train, args.device), encode(model, x_test, args.device)
    y_train, y_test = target.train.labels, target.test.labels
    r["dim_names"] = (metrics.name_dims(r["disentanglement"]["dci"]["importance"], src.factor_names)
                      if r["disentanglement"] else [f"dim{d}" for d in range(z_train.shape[1])])
    # Design §5: dims with std < 0.05 on the train split are removed before the classifiers.
    pruned = attempt("pruning", lambda: metrics.prune_inactive(z_train[known["train"]], z_test, threshold=0.05))
    r["active_dims"] = [int(d) for d in pruned[0]] if pruned else []
    r["gini_importance"] = np.zeros(z_train.shape[1]).tolist()
    r["downstream"] = r["clustering"] = r["open_set"] = None
    if pruned:
        kept, zk_train, zk_test = pruned
        r["downstream"] = down = metrics.downstream_accuracy(zk_train, y_train[known["train"]],
                                                             zk_test[known["test"]], y_test[known["test"]], seed=0)
        r["gini_importance"] = np.zeros(z_train.shape[1])
        r["gini_importance"][kept] = down.pop("gbt_importance")
        r["clustering"] = attempt("clustering", lambda: metrics.clustering_scores(
            zk_test[known["test"]], y_test[known["test"]], seed=0))
        if args.holdout_class:
            held = target.classes.index(args.holdout_class)
            r["open_set"] = attempt("open set", lambda: metrics.open_set(
                zk_train, y_train[known["train"]], zk_test, y_test, held, k=5, quantile=0.95, seed=0))
    if target.test.has_masks:
        feats = test_handcrafted(target)
        r["correlation"] = {}
        for f, h in CORRELATED:
            if f in r["dim_names"]:
                c = metrics.correlations(z_test[:, [r["dim_names"].index(f)]], {h: feats[h]})[0][h]
                # the sign of a latent axis is arbitrary (z and -z are the same code): compare |r| across models
                r["correlation"][f"{f}:{h}"] = dict(c, abs_r=abs(c["r"]), dim=r["dim_names"].index(f))
    r["_z_test"] = z_test  # for figures only; dropped before writing JSON
    return r


# Latent factor ↔ handcrafted feature pairs of the paper's Fig. 6
CORRELATED = (("scale", "area"), ("colour", "mean_r"), ("shape", "solidity"))

_FEATURES = {}


def test_handcrafted(target):
    """Handcrafted features of the test split, from its masks (area, mean R/G/B inside, solidity)."""
    if target.digest not in _FEATURES:
        idx = np.arange(len(target.test))
        _FEATURES[target.digest] = data.handcrafted_features(target.test.images(idx, 224),
                                                            target.test.masks(idx, 224))
    return _FEATURES[target.digest]


def raw_baseline(args, x_train, x_test, target, known):
    """Table V: the same classifiers on the raw input, no VAE: Φ (768-d), or pixels average-pooled to
    8×8×3 = 192 values (the GBT's time grows with the width: 64×64×3 would take hours on a CPU)."""
    def flat(x):
        x = train.to_model(x)
        if x.dim() == 4:
            x = torch.nn.functional.avg_pool2d(x, 8)
        return x.flatten(1).numpy().astype(np.float64)
    a, b = flat(x_train)[known["train"]], flat(x_test)[known["test"]]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_common_args(p)
    p.add_argument("--no-train", action="store_true", help="fail instead of training missing models")
    p.add_argument("--n-train", type=int, help="DCI/MIG samples (default 10000, quick 2000)")
    p.add_argument("--n-test", type=int, help="DCI test samples (default 5000, quick 1000)")
    p.add_argument("--dci", choices=["gbt", "hist"], default="gbt",
                   help="DCI classifier: gbt = disentanglement_lib's GradientBoostingClassifier (default), "
                        "hist = a ~20x faster approximation (never mix the two in one table)")
    args = train.settle(p.parse_args(argv))
    drl.keep_freed_memory()  # recycle freed activations instead of page-faulting them back (see there)
    if not args.target:
        raise ValueError("--target is required; one of: " + ", ".join(train.data.TARGETS))
    args.n_train = args.n_train or (2000 if args.quick else 10000)
    args.n_test = args.n_test or (1000 if args.quick else 5000)
    t0 = time.time()
    target = train.load_target(args)
    if args.holdout_class and args.holdout_class not in target.classes:
        raise ValueError(f"--holdout-class {args.holdout_class!r} is not a class of {args.target}; "
                         f"classes: {', '.join(target.classes)}")
    train.resolve_backbone(args)
    if args.no_train:
        missing = [p for p in _expected_checkpoints(args) if not train._done(p)]
        if missing:
            raise ValueError(f"--no-train but {len(missing)} model(s) are missing, e.g. {missing[0]}; "
                             "run without --no-train (or train.py) first")
    say(f"evaluate: {args.target}, backbone {args.backbone}, {len(args.seeds) * len(args.betas)} model(s); "
        "training what is missing")
    pairs = train.train_finetune(args, target)
    src = train.SourceInputs(args)
    first = drl.load_checkpoint(pairs[0][0])
    x_train = train.target_inputs(args, target.train, first, f"{args.target}-train")
    x_test = train.target_inputs(args, target.test, first, f"{args.target}-test")
    known = {"train": np.ones(len(target.train), bool), "test": np.ones(len(target.test), bool)}
    if args.holdout_class:
        held = target.classes.index(args.holdout_class)
        known = {"train": target.train.labels != held, "test": target.test.labels != held}

    per_model = []
    for src_path, ft_path in pairs:
        row = {}
        for state, path in zip(STATES, (src_path, ft_path)):
            model, ckpt = drl.load_model(path, args.device)
            say(f"evaluate: {state:6s} beta={ckpt['config']['beta']:g} seed={ckpt['config']['seed']}")
            row[state] = evaluate_model(model, src, x_train, x_test, target, known, args,
                                        f"{state} finetuning beta={ckpt['config']['beta']:g} seed={ckpt['config']['seed']}")
        row["beta"], row["seed"] = ckpt["config"]["beta"], ckpt["config"]["seed"]
        per_model.append(row)
    baseline = raw_baseline(args, x_train, x_test, target, known)

    folder = os.path.join(args.out, "eval", args.target + (f"-without-{args.holdout_class}" if args.holdout_class
                                                           else ""), train.model_tag(args) + f"-{args.epochs}ep")
    figures = make_figures(folder, per_model, target, args, src.factor_names)
    for m in per_model:
        for state in STATES:
            m[state].pop("_z_test")
    results = {"target": args.target, "backbone": args.backbone, "arch": args.arch, "method": args.method,
               "classes": target.classes, "holdout_class": args.holdout_class, "quick": args.quick,
               "protocol": {k: getattr(args, k) for k in ("seeds", "betas", "steps", "epochs", "batch_size", "lr",
                                                           "latent_dim", "n_train", "n_test")},
               "n_train_images": len(target.train), "n_test_images": len(target.test),
               "models": per_model, "summary": summarise(per_model), "raw_input_baseline": baseline,
               "figures": figures, "seconds": round(time.time() - t0, 1)}
    write_atomic(os.path.join(folder, "results.json"), json.dumps(results, indent=1, default=_json_default))
    write_atomic(os.path.join(folder, "report.md"), report(results))
    say(f"done in {time.time() - t0:.0f} s: {os.path.join(folder, 'report.md')}")


def _expected_checkpoints(args):
    paths = []
    for b in args.betas:
        for s in args.seeds:
            paths += [os.path.join(train.source_folder(args, b, s), "checkpoint.pt"),
                      os.path.join(train.finetune_folder(args, b, s), "checkpoint.pt")]
    return paths


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def write_atomic(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Report (every number comes from the results dict, so report.md and results.json always agree)
# ---------------------------------------------------------------------------------------------------------

def pct(summary, state, key):
    return num(summary, state, key, scale=100, digits=2)


def num(summary, state, key, scale=1, digits=3):
    """mean ± SD of one summary entry; '(n=k)' when only k of the models have the number."""
    s = summary[state].get(key)
    if s is None:
        return "n/a"
    partial = f" (n={s['n']})" if s["n"] < summary["n_models"] else ""
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['sd']:.{digits}f}{partial}"


def report(res):
    s = res["summary"]
    n = len(res["models"])
    lines = [f"# {res['target']}: transfer of a disentangled representation",
             "",
             f"Backbone **{res['backbone']}** ({res['arch']} VAE, source method {res['method']}); {n} model(s) "
             f"(seeds {res['protocol']['seeds']}, β {res['protocol']['betas']}), {res['protocol']['steps']} source "
             f"steps, {res['protocol']['epochs']} finetuning epochs" + (" — **quick run**" if res["quick"] else "")
             + f". Target: {res['n_train_images']} train / {res['n_test_images']} test images, classes: "
             + ", ".join(res["classes"]) + ". Values are mean ± SD over models.",
             "",
             "## Table II — downstream accuracy (%) on the disentangled representation",
             "",
             "| finetuned | GBT | MLP | GBT balanced | MLP balanced |", "| --- | --- | --- | --- | --- |"]
    for state, mark in zip(STATES, ("no", "yes")):
        lines.append(f"| {mark} | {pct(s, state, 'downstream.gbt')} | {pct(s, state, 'downstream.mlp')} | "
                     f"{pct(s, state, 'downstream.gbt_balanced')} | {pct(s, state, 'downstream.mlp_balanced')} |")
    b = res["raw_input_baseline"]
    lines += ["", "## Table V — the same classifiers on the raw input (no disentanglement)", "",
              f"Input: {'DINO features Φ (768-d)' if res['backbone'] == 'dino' else 'pixels average-pooled to 8×8 RGB (192 values)'}."
              f" GBT {100 * b['gbt']:.2f} %, MLP {100 * b['mlp']:.2f} %.",
              "", "## Table III — disentanglement on Texture-dSprites (%), before/after finetuning", "",
              "| finetuned | DCI D | DCI C | DCI I (test) | MIG | OMES |", "| --- | --- | --- | --- | --- | --- |"]
    for state, mark in zip(STATES, ("no", "yes")):
        d = "disentanglement."
        lines.append(f"| {mark} | {pct(s, state, d + 'dci.disentanglement')} | {pct(s, state, d + 'dci.completeness')}"
                     f" | {pct(s, state, d + 'dci.informativeness_test')} | {pct(s, state, d + 'mig')} | "
                     f"{pct(s, state, d + 'omes.omes')} |")
    lines += ["", "## Clustering (K-Means, k = number of classes)", "", "| finetuned | AMI | silhouette |",
              "| --- | --- | --- |"]
    for state, mark in zip(STATES, ("no", "yes")):
        lines.append(f"| {mark} | {num(s, state, 'clustering.ami')} | {num(s, state, 'clustering.silhouette')} |")
    lines += ["", "## Interpretability", "",
              "Each latent dim is named after the source factor it encodes best (DCI importance on Texture-dSprites)."
              " Gini importance of the GBT per named dim, mean over models:", "",
              "| finetuned | " + " | ".join(res["figures"]["factor_order"]) + " |",
              "| --- |" + " --- |" * len(res["figures"]["factor_order"])]
    for state, mark in zip(STATES, ("no", "yes")):
        imp = res["figures"]["importance_by_factor"][state]
        lines.append(f"| {mark} | " + " | ".join(f"{imp[f]:.3f}" for f in res["figures"]["factor_order"]) + " |")
    corr_keys = sorted({k for m in res["models"] for k in m["after"].get("correlation", {})})
    if corr_keys:
        lines += ["", "|Pearson r| between the latent dim named after a factor and a handcrafted feature of the test "
                  "split (from masks; the sign of a latent axis is arbitrary):", "",
                  "| latent:feature | before | after |", "| --- | --- | --- |"]
        for k in corr_keys:
            lines.append(f"| {k} | {num(s, 'before', 'correlation.' + k + '.abs_r')} | "
                         f"{num(s, 'after', 'correlation.' + k + '.abs_r')} |")
    if res["holdout_class"]:
        lines += ["", f"## Open set: held-out class {res['holdout_class']}", "",
                  "| finetuned | detection rate | false alarms | AUROC |", "| --- | --- | --- | --- |"]
        for state, mark in zip(STATES, ("no", "yes")):
            lines.append(f"| {mark} | {pct(s, state, 'open_set.detection_rate')} | "
                         f"{pct(s, state, 'open_set.false_alarm_rate')} | {num(s, state, 'open_set.auroc')} |")
        for state in STATES:
            counts = {}
            for m in res["models"]:
                for c, n in (m[state]["open_set"] or {"predicted_counts": {}})["predicted_counts"].items():
                    counts[res["classes"][int(c)]] = counts.get(res["classes"][int(c)], 0) + n
            lines.append(f"\nHeld-out test samples classified by the GBT of the known classes ({state} finetuning, "
                         "summed over models): " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) + ".")
    lines += ["", "## Figures", ""] + [f"- {k}: `{v}`" for k, v in res["figures"].items()
                                        if isinstance(v, str)]
    lines += ["", f"Every number above is in `results.json` (per model). Run time {res['seconds']} s.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Figures (paper Figs. 3-7)
# ---------------------------------------------------------------------------------------------------------

def make_figures(folder, per_model, target, args, factor_names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = os.path.join(folder, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    out = {"factor_order": list(factor_names), "importance_by_factor": {}}

    # Fig. 3: Gini importance per factor (dims grouped by the factor they encode best), before/after
    for state in STATES:
        acc = {f: [] for f in factor_names}
        for m in per_model:
            per_f = {f: 0.0 for f in factor_names}
            for name, imp in zip(m[state]["dim_names"], m[state]["gini_importance"]):
                base = name.split("#")[0]
                if base in per_f:
                    per_f[base] += imp
            for f in factor_names:
                acc[f].append(per_f[f])
        out["importance_by_factor"][state] = {f: float(np.mean(v)) for f, v in acc.items()}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, state in zip(axes, STATES):
        vals = out["importance_by_factor"][state]
        ax.bar(list(vals), list(vals.values()), color="tab:blue" if state == "before" else "tab:orange")
        ax.set_title(f"{state} finetuning")
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylabel("Gini importance (GBT)")
    out["fig3_importance"] = _save(fig, fig_dir, "fig3_importance.png")

    # Figs. 4-5: the two most important dims of the first model after finetuning, coloured by class
    m = per_model[0]["after"]
    order = np.argsort(m["gini_importance"])[::-1][:2]
    z = m["_z_test"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for c, name in enumerate(target.classes):
        sel = target.test.labels == c
        ax.scatter(z[sel, order[0]], z[sel, order[1]], s=8, label=name, alpha=0.7)
    ax.set_xlabel(f"z{order[0]} ({m['dim_names'][order[0]]})")
    ax.set_ylabel(f"z{order[1]} ({m['dim_names'][order[1]]})")
    ax.legend(fontsize=7, markerscale=2)
    out["fig4_top2_dims"] = _save(fig, fig_dir, "fig4_top2_dims.png")

    # Fig. 6: latent scale / colour / shape dims against handcrafted area / mean red / solidity
    if target.test.has_masks:
        feats = test_handcrafted(target)
        pairs = [(f, h) for f, h in (("scale", "area"), ("colour", "mean_r"), ("shape", "solidity"))
                 if f in m["dim_names"]]
        if pairs:
            fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.5), squeeze=False)
            for ax, (f, h) in zip(axes[0], pairs):
                d = m["dim_names"].index(f)
                ax.scatter(feats[h], z[:, d], s=6, alpha=0.6)
                r = m.get("correlation", {}).get(f"{f}:{h}", {}).get("r", float("nan"))
                ax.set_title(f"{f} dim z{d} vs {h}: r = {r:.2f}")
                ax.set_xlabel(f"handcrafted {h}")
                ax.set_ylabel(f"z{d}")
            out["fig6_correlation"] = _save(fig, fig_dir, "fig6_correlation.png")

    # Fig. 7: per-dim mean |z - centroid| of the held-out class to its most likely known class
    if args.holdout_class and m.get("open_set"):
        dist = m["open_set"].get("centroid_distance_assigned")
        if dist is not None:
            names = [m["dim_names"][d] for d in m["active_dims"]]
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.bar(range(len(dist)), dist)
            ax.set_xticks(range(len(dist)), names, rotation=30)
            ax.set_ylabel("mean |z - centroid|")
            assigned = target.classes[int(m["open_set"]["assigned"])]
            ax.set_title(f"held-out {args.holdout_class}: distance to the centroid of {assigned}")
            out["fig7_open_set"] = _save(fig, fig_dir, "fig7_open_set.png")
    return out


def _save(fig, folder, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(folder, name)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return os.path.relpath(path, os.path.dirname(folder))


if __name__ == "__main__":
    train.run_main(main)
