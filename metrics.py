"""Disentanglement metrics (DCI, MIG, OMES) and the evaluation helpers of the target analysis.

Plain numpy arrays in, plain numbers out. Imports only numpy, scipy and scikit-learn, so the file can be
copied into another project.

Conventions
- Codes `z`: float array (n, d), one row per image (the posterior mean μ of a VAE).
- Factors `y`: array (n, K) of discrete factor values (any labels: they are encoded to 0..m-1 per column).
- Every default is pinned and written in the docstring; the same seed gives the same numbers.

References:
- DCI: Eastwood & Williams 2018, as implemented in google-research/disentanglement_lib
  `evaluation/metrics/dci.py`.
- MIG: Chen et al. 2018, disentanglement_lib `evaluation/metrics/mig.py` + `utils.py`.
- OMES: Dapueto et al. 2024/2025, `omes.py` of the official Malga-Vision/disentangled_representation_microscopy.
- Downstream / interpretability / open set: Dapueto et al. 2025, Sec. III-IV, and the same official code.
"""
import itertools
import math
import warnings

import numpy as np
import scipy.stats
from sklearn.cluster import KMeans
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import (adjusted_mutual_info_score, balanced_accuracy_score, mutual_info_score,
                             roc_auc_score, silhouette_score)
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.parallel import Parallel, delayed

INACTIVE_STD = 0.05      # a code dim with std below this is "inactive" (official OMES / pruning threshold)
MIG_BINS = 20            # disentanglement_lib mig.gin: histogram_discretizer, num_bins = 20
DCI_EPS = 1e-11          # disentanglement_lib adds 1e-11 to every importance before the entropy


# --- Input checks (one-line ValueErrors instead of NaN or a crash deep inside scikit-learn) ----------------------

def _codes(z, name="z", min_dims=2, allow_constant=False):
    """z as float64 (n, d); raise on wrong shape, too few dims/rows, NaN/inf or (unless allowed) codes whose
    every dim is constant. A single constant dim is fine (it gets zero importance / MI and OMES drops it)."""
    z = np.asarray(z)
    if z.dtype == object or not np.issubdtype(z.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array of codes (n, d), got dtype {z.dtype}")
    z = z.astype(np.float64)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < min_dims:
        raise ValueError(f"{name} has shape {z.shape}; codes are (n samples, d dims) and need at least 2 samples and "
                         f"{min_dims} dim(s)")
    if not np.all(np.isfinite(z)):
        bad = np.unique(np.nonzero(~np.isfinite(z))[1])
        raise ValueError(f"{name} contains NaN or inf in code dim(s) {bad.tolist()}; check the encoder output")
    if not allow_constant and np.all(z.max(axis=0) == z.min(axis=0)):
        raise ValueError(f"{name}: every code dim is constant, the representation carries no information "
                         f"(collapsed model?)")
    return z


def _labels(y, n, name="y"):
    """y as (n, K); raise on a length mismatch or NaN labels."""
    y = np.asarray(y)
    y = y[:, None] if y.ndim == 1 else y
    if y.ndim != 2:
        raise ValueError(f"{name} must be (n,) or (n, K) factor labels, got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} rows but the codes have {n}; pass one label row per code row")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contains NaN or inf labels")
    return y


def _encode(*columns):
    """Encode label columns (any dtype) jointly to integers 0..m-1 (same mapping for every column)."""
    _, codes = np.unique(np.concatenate([np.ravel(c) for c in columns]), return_inverse=True)
    return np.split(codes.astype(np.int64), np.cumsum([len(c) for c in columns])[:-1])


def inactive_dims(z, threshold=INACTIVE_STD):
    """Indices of the dims of float codes z (n, d) whose standard deviation (ddof=1, over all rows) is below
    `threshold`, as a sorted int64 array. Official OMES draws 10,000 rows with replacement before taking the
    std; we use every row (deterministic)."""
    return np.flatnonzero(z.std(axis=0, ddof=1) < threshold).astype(np.int64)


# --- DCI (Eastwood & Williams 2018; disentanglement_lib dci.py) --------------------------------------------------

def _fit_factor(z_train, t_train, z_test, t_test, seed):
    """disentanglement_lib's classifier for one factor, `GradientBoostingClassifier()` with scikit-learn's
    defaults (log-loss, 100 stages, learning_rate 0.1, max_depth 3), seeded.
    Returns (|feature importances| over codes, train accuracy, test accuracy)."""
    model = GradientBoostingClassifier(random_state=seed).fit(z_train, t_train)
    return (np.abs(model.feature_importances_), float(model.score(z_train, t_train)),
            float(model.score(z_test, t_test)))


def dci_from_importance(importance):
    """Disentanglement and completeness of an importance matrix R (codes × factors), exactly as
    disentanglement_lib: 1e-11 added before scipy's entropy normalises each row/column, entropy base
    K = #factors (disentanglement) and D = #codes (completeness), weights = importance share, an all-zero R
    gets uniform weights. R: a non-negative (codes, factors) float array, as `dci` builds it.
    Returns (D, C, D per code, C per factor)."""
    R = np.asarray(importance, dtype=np.float64)
    n_codes, n_factors = R.shape
    d_per_code = 1.0 - scipy.stats.entropy(R.T + DCI_EPS, base=n_factors)        # D_i = 1 - H_K(P_i.)
    c_per_factor = 1.0 - scipy.stats.entropy(R + DCI_EPS, base=n_codes)         # C_j = 1 - H_D(P~_.j)
    W = np.ones_like(R) if R.sum() == 0 else R
    rho = W.sum(axis=1) / W.sum()                                               # code weights ρ_i
    w = W.sum(axis=0) / W.sum()                                                 # factor weights
    return float(np.sum(rho * d_per_code)), float(np.sum(w * c_per_factor)), d_per_code, c_per_factor


def dci(z_train, y_train, z_test, y_test, seed=0, *, n_jobs=-1):
    """DCI disentanglement, completeness and informativeness (disentanglement_lib settings).

    z_train (n, d), y_train (n, K), z_test (m, d), y_test (m, K). Factor labels of any type are encoded to
    integers first (jointly over train and test). For each factor one scikit-learn
    `GradientBoostingClassifier(random_state=seed)` with the library's defaults (as disentanglement_lib,
    which leaves the seed unset) predicts it from all codes; importance[:, j] = |feature_importances_|
    (impurity based, sums to 1). Informativeness = mean over factors of classification ACCURACY (not error),
    train and test. Factors constant over train+test are skipped with a warning (importance column 0).
    n_jobs: parallel workers for the per-factor fits (joblib; -1 = all cores); results do not depend on it.

    Returns dict(disentanglement, completeness, informativeness_train, informativeness_test,
    importance (d, K) array, disentanglement_per_code (d,), completeness_per_factor (K,; 0 for skipped),
    accuracy_train (K,), accuracy_test (K,) (NaN-free: 1.0 for skipped factors), factors_used (list of int)).
    """
    z_train, z_test = _codes(z_train, "z_train"), _codes(z_test, "z_test")
    if z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"z_train has {z_train.shape[1]} code dims but z_test has {z_test.shape[1]}")
    y_train, y_test = _labels(y_train, len(z_train), "y_train"), _labels(y_test, len(z_test), "y_test")
    if y_train.shape[1] != y_test.shape[1]:
        raise ValueError(f"y_train has {y_train.shape[1]} factors but y_test has {y_test.shape[1]}")
    n_codes, n_factors = z_train.shape[1], y_train.shape[1]
    used, targets = [], []
    for j in range(n_factors):
        t_train, t_test = _encode(y_train[:, j], y_test[:, j])
        n_train_values = len(np.unique(t_train))
        if n_train_values == 1 and len(np.unique(t_test)) == 1 and t_train[0] == t_test[0]:
            warnings.warn(f"dci: factor {j} is constant (entropy 0) and is skipped")
            continue
        if n_train_values == 1:
            raise ValueError(f"dci: factor {j} takes a single value in the training split "
                             f"({len(t_train)} samples) but varies in the test split; use more training samples")
        used.append(j)
        targets.append((t_train, t_test))
    if len(used) < 2:
        raise ValueError(f"dci needs at least 2 non-constant factors, got {len(used)}")
    # Largest factors first so the longest fit starts at once (better load balance over workers).
    order = sorted(range(len(used)), key=lambda i: -len(np.unique(targets[i][0])))
    fits = Parallel(n_jobs=n_jobs)(delayed(_fit_factor)(z_train, targets[i][0], z_test, targets[i][1], seed)
                                   for i in order)
    R = np.zeros((n_codes, len(used)))
    acc_train, acc_test = np.ones(n_factors), np.ones(n_factors)
    for i, (imp, a_tr, a_te) in zip(order, fits):
        R[:, i] = imp
        acc_train[used[i]], acc_test[used[i]] = a_tr, a_te
    d, c, d_per_code, c_used = dci_from_importance(R)
    importance = np.zeros((n_codes, n_factors))
    importance[:, used] = R
    c_per_factor = np.zeros(n_factors)
    c_per_factor[used] = c_used
    return dict(disentanglement=d, completeness=c,
                informativeness_train=float(np.mean(acc_train[used])),
                informativeness_test=float(np.mean(acc_test[used])),
                importance=importance, disentanglement_per_code=d_per_code, completeness_per_factor=c_per_factor,
                accuracy_train=acc_train, accuracy_test=acc_test, factors_used=used)


# --- MIG (Chen et al. 2018; disentanglement_lib mig.py / utils.py) -----------------------------------------------

def histogram_discretize(z, bins=MIG_BINS):
    """disentanglement_lib `_histogram_discretize`: per code, equal-width bins over [min, max]
    (np.histogram edges); labels = np.digitize(z, edges[:-1]) in 1..bins, the maximum falls in bin `bins`."""
    z = np.asarray(z, dtype=np.float64)
    out = np.zeros(z.shape, dtype=np.int64)
    for i in range(z.shape[1]):
        out[:, i] = np.digitize(z[:, i], np.histogram(z[:, i], bins)[1][:-1])
    return out


def mig(z, y, bins=MIG_BINS):
    """Mutual Information Gap (disentanglement_lib settings).

    Each code is discretised into `bins` (default 20) equal-width histogram bins; I[i, j] =
    sklearn `mutual_info_score(y_j, bin_i)` (plug-in estimate, nats); H_j = mutual_info_score(y_j, y_j).
    MIG = mean over factors of (largest I − second largest I) / H_j. Factors with H_j = 0 (constant) are
    skipped with a warning (disentanglement_lib would return NaN). Needs at least 2 code dims.
    """
    z = _codes(z, "z")
    y = _labels(y, len(z), "y")
    if not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"mig bins must be an integer >= 2, got {bins!r}")
    zb = histogram_discretize(z, bins)
    gaps = []
    for j in range(y.shape[1]):
        (t,) = _encode(y[:, j])
        h = mutual_info_score(t, t)
        if h <= 0:
            warnings.warn(f"mig: factor {j} is constant (entropy 0) and is skipped")
            continue
        mi = np.sort([mutual_info_score(t, zb[:, i]) for i in range(z.shape[1])])[::-1]
        gaps.append((mi[0] - mi[1]) / h)
    if not gaps:
        raise ValueError("mig: every factor is constant, nothing to score")
    return float(np.mean(gaps))


# --- OMES (Dapueto et al.; the official omes.py) -----------------------------------------------------------------

def grid_relation_matrix(z_grid, factor_sizes, pairs="resample"):
    """OMES relation matrix M (d, K) over EVERY pair of a full factor grid (the official code samples at most
    100,000 pairs; this is exact, with no seed noise).

    M[d, f] = 1 − |Pearson r of z_d(x) and z_d(x')| over the pairs (x, x') that differ in factor f alone, rounded
    to 4 decimals as in the official code. M ≈ 1: dim d changes when factor f changes (it encodes f); M ≈ 0: dim
    d ignores f. z_grid: codes (prod(sizes), d) of all grid points in C order (np.ndindex(*factor_sizes)); each
    point is the anchor x of its pairs once:
    - pairs="resample": x'_f uniform over all s_f values (x' = x included). Pearson over these pairs is
      r = B / σ² with B the variance of the group means (mean over f with the other factors fixed) and σ² the
      total variance, so M = 1 − r = E[Var(z_d | other factors)] / Var(z_d) ∈ [0, 1].
    - pairs="differ": x'_f ≠ x_f (the official pairs): r = (s_f·B − σ²) / ((s_f − 1)·σ²).
    Both equal Pearson's r on the explicit list of those pairs (tested). A constant dim gives M = 0; a factor of
    size 1, a column of zeros.
    """
    sizes = tuple(int(s) for s in factor_sizes)
    z = np.asarray(z_grid, dtype=np.float64)
    if z.ndim != 2 or len(z) != int(np.prod(sizes)):
        raise ValueError(f"z_grid must be (prod(factor_sizes) = {int(np.prod(sizes))}, d), got {z.shape}")
    if pairs not in ("resample", "differ"):
        raise ValueError(f"pairs must be 'resample' or 'differ', got {pairs!r}")
    total = z.var(axis=0)
    cube = z.reshape(*sizes, z.shape[1])
    M = np.zeros((z.shape[1], len(sizes)))
    for f, s in enumerate(sizes):
        if s < 2:
            continue
        between = np.broadcast_to(cube.mean(axis=f, keepdims=True), cube.shape).reshape(z.shape).var(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = between / total if pairs == "resample" else (s * between - total) / ((s - 1) * total)
        M[:, f] = np.where(total > 0, 1.0 - np.minimum(np.abs(r), 1.0), 0.0)
    return np.round(M, 4)


def omes_from_relation(M, alpha=0.5, pooling="avg"):
    """OMES of a relation matrix M (active dims × factors), the official definition (omes.py):
    O(d,f) = 1 − mean_j |1[j=f] − M[d,j]|   (overlap / modularity, mean over factors)
    E(d,f) = 1 − mean_k |1[k=d] − M[k,f]|   (multiple encoding / compactness, mean over dims)
    pooling "avg": OS_f = Σ_d M[d,f]² O(d,f) / Σ_d M[d,f]  (= np.average(O·M, weights=M)); "max": max_d O·M.
    A factor no dim responds to (column of zeros) scores 0 (the official code divides by zero).
    Score = mean_f [α OS_f + (1 − α) ME_f]. Returns (score, modularity, compactness, per-factor scores)."""
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] < 1 or M.shape[1] < 1:
        raise ValueError(f"relation matrix must be (dims >= 1, factors >= 1), got shape {M.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"omes alpha must be in [0, 1], got {alpha}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"omes pooling must be 'avg' (official default) or 'max', got {pooling!r}")
    n_dims, n_factors = M.shape
    O = 1.0 - np.abs(np.eye(n_factors)[None, :, :] - M[:, None, :]).mean(axis=2)   # O[d, f]
    E = 1.0 - np.abs(np.eye(n_dims)[:, :, None] - M[None, :, :]).mean(axis=1)      # E[d, f]
    os_f, me_f = np.zeros(n_factors), np.zeros(n_factors)
    for f in range(n_factors):
        m = M[:, f]
        if pooling == "max":
            os_f[f], me_f[f] = np.max(O[:, f] * m), np.max(E[:, f] * m)
        elif m.sum() > 0:
            os_f[f], me_f[f] = np.average(O[:, f] * m, weights=m), np.average(E[:, f] * m, weights=m)
    per_factor = alpha * os_f + (1.0 - alpha) * me_f
    return float(per_factor.mean()), float(os_f.mean()), float(me_f.mean()), per_factor


# --- All three from the codes of a factor grid (Texture-dSprites or any other) ------------------------------------

def disentanglement_scores(z_grid, factor_sizes, n_train=10000, n_test=5000, seed=0, *, n_jobs=-1,
                           omes_pairs="resample"):
    """DCI, MIG and OMES of one model from the codes of its whole factor grid (Texture-dSprites: 25,200 images).

    z_grid (prod(factor_sizes), d): the deterministic code (e.g. μ) of every grid point in C order. With `seed`
    fixed (default 0) every model is scored on the same images.
    - DCI / MIG: n_train = 10,000 and n_test = 5,000 factor rows drawn uniformly from the grid (with
      replacement), as in disentanglement_lib's study configs. DCI: train/test; MIG: the train codes.
    - OMES on every pair of the grid (grid_relation_matrix): exact, no seed noise. omes_pairs="resample"
      (default) redraws the changed factor over all its values, so a dim that encodes it alone gives
      uncorrelated codes (M = 1); with "differ", the official pairs, even a perfect linear code of a k-valued
      factor has r = −1/(k−1) (M = 0.5 for shape). Inactive dims (std < 0.05) are found on the train codes.
    Returns dict(dci=dci(...) (n_jobs goes there), mig, omes=dict(omes, modularity (mean_f OS_f, the α=1 score),
    compactness (mean_f ME_f, the α=0 score), per_factor, relation (d, K') M of the factors with >= 2 values,
    active (the dims scored), factors (those K'), pairs "all"), n_train, n_test, seed, omes_pairs).
    """
    sizes = tuple(int(s) for s in factor_sizes)
    z_grid = _codes(z_grid, "z_grid")
    if len(z_grid) != math.prod(sizes) or min(n_train, n_test) < 2:
        raise ValueError(f"need the codes of all {math.prod(sizes)} grid points (got {len(z_grid)}) and n_train, "
                         f"n_test >= 2 (got {n_train}, {n_test})")
    rng = np.random.default_rng(seed)
    f_train = np.stack([rng.integers(0, s, n_train) for s in sizes], axis=1)
    f_test = np.stack([rng.integers(0, s, n_test) for s in sizes], axis=1)
    z_train = z_grid[np.ravel_multi_index(f_train.T, sizes)]
    z_test = z_grid[np.ravel_multi_index(f_test.T, sizes)]
    varying = [f for f, s in enumerate(sizes) if s >= 2]
    M = grid_relation_matrix(z_grid, sizes, omes_pairs)[:, varying]
    active = np.setdiff1d(np.arange(M.shape[0]), inactive_dims(z_train))
    if len(active) == 0:
        raise ValueError(f"omes: all {M.shape[0]} code dims are inactive (std < {INACTIVE_STD}) on the train codes; "
                         f"the representation is collapsed")
    score, modularity, compactness, per_factor = omes_from_relation(M[active])
    omes = dict(omes=score, modularity=modularity, compactness=compactness, per_factor=per_factor, relation=M,
                active=active, factors=varying, pairs="all")
    return dict(dci=dci(z_train, f_train, z_test, f_test, seed=seed, n_jobs=n_jobs), mig=mig(z_train, f_train),
                omes=omes, n_train=n_train, n_test=n_test, seed=seed, omes_pairs=omes_pairs)


# --- Target evaluation helpers (Dapueto et al. 2025, Sec. III-IV) ------------------------------------------------

def _xy(z, y, name):
    z = _codes(z, f"z_{name}", 1, allow_constant=True)
    y = _labels(y, len(z), f"y_{name}")
    if y.shape[1] != 1:
        raise ValueError(f"y_{name} must be one class label per sample, got shape {y.shape}")
    return z, y[:, 0]


def downstream_accuracy(z_train, y_train, z_test, y_test, seed=0, *, mlp_max_iter=300, gbt_max_features=None):
    """Target classification from codes (paper Tables II and V; the official downstream_task.py).

    GBT: GradientBoostingClassifier(learning_rate=0.1, max_depth=4, random_state=seed), 100 trees, raw codes.
    MLP: MLPClassifier(hidden_layer_sizes=(256, 256), alpha=1e-7, random_state=seed) on inputs standardised
    with the train mean/std. Deviation from the official MLP (learning_rate_init=1e-4, tol=1e-7,
    max_iter=1e6, i.e. train until the loss stops moving): we use Adam learning_rate_init=1e-3, tol=1e-4,
    max_iter=mlp_max_iter (300), n_iter_no_change=10, which converges in seconds to a minute on 2 cores;
    `mlp_converged` says whether it stopped on its own. gbt_max_features (sklearn's max_features, default
    all) lets a quick run look at a random subset of the features per split, for wide inputs like Φ.

    Returns dict(gbt, mlp (test accuracy), gbt_balanced, mlp_balanced (mean per-class recall),
    gbt_train, mlp_train (train accuracy), mlp_converged, gbt_importance (d,) Gini importance, sums to 1).
    """
    z_train, y_train = _xy(z_train, y_train, "train")
    z_test, y_test = _xy(z_test, y_test, "test")
    if z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"z_train has {z_train.shape[1]} dims but z_test has {z_test.shape[1]}")
    if len(np.unique(y_train)) < 2:
        raise ValueError("downstream_accuracy needs at least 2 classes in y_train")
    gbt = _downstream_gbt(seed).set_params(max_features=gbt_max_features).fit(z_train, y_train)
    scaler = StandardScaler().fit(z_train)
    mlp = MLPClassifier(hidden_layer_sizes=(256, 256), alpha=1e-7, learning_rate_init=1e-3, tol=1e-4,
                        max_iter=mlp_max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        mlp.fit(scaler.transform(z_train), y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    p_gbt, p_mlp = gbt.predict(z_test), mlp.predict(scaler.transform(z_test))
    with warnings.catch_warnings():  # a class absent from the test split: its recall is left out
        warnings.simplefilter("ignore", UserWarning)
        balanced = [float(balanced_accuracy_score(y_test, p)) for p in (p_gbt, p_mlp)]
    return dict(gbt=float(np.mean(p_gbt == y_test)), mlp=float(np.mean(p_mlp == y_test)),
                gbt_balanced=balanced[0], mlp_balanced=balanced[1],
                gbt_train=float(gbt.score(z_train, y_train)),
                mlp_train=float(mlp.score(scaler.transform(z_train), y_train)),
                mlp_converged=converged, gbt_importance=gbt.feature_importances_.copy())


def explicitness(phi_train, f_train, phi_test, f_test, factor_names, seed=0, *, n_jobs=-1,
                 gbt_max_features=None):
    """Explicitness of a representation (paper Table IV): can each factor be classified from it? Per factor,
    the test accuracy of the downstream GBT and MLP (`downstream_accuracy`) trained on phi to predict it;
    "all" is the mean over factors. f_* are (n, K) factor values; factors are fitted in parallel (joblib);
    gbt_max_features goes to downstream_accuracy."""
    f_train, f_test = np.asarray(f_train), np.asarray(f_test)
    if f_train.ndim != 2 or f_train.shape[1] != len(factor_names) or f_test.shape[1:] != f_train.shape[1:]:
        raise ValueError(f"factors must be (n, {len(factor_names)}), got {f_train.shape} and {f_test.shape}")
    fit = delayed(downstream_accuracy)
    fits = Parallel(n_jobs=n_jobs)(fit(phi_train, f_train[:, j], phi_test, f_test[:, j], seed,
                                       gbt_max_features=gbt_max_features) for j in range(len(factor_names)))
    out = {name: {"gbt": r["gbt"], "mlp": r["mlp"], "mlp_converged": r["mlp_converged"]}
           for name, r in zip(factor_names, fits)}
    out["all"] = {c: float(np.mean([out[name][c] for name in factor_names])) for c in ("gbt", "mlp")}
    return out


def _downstream_gbt(seed):
    """The paper's downstream GBT (the official downstream_task.py): learning rate 0.1, depth 4, 100 stages."""
    return GradientBoostingClassifier(learning_rate=0.1, max_depth=4, random_state=seed)


def prune_inactive(z_train, *others, threshold=INACTIVE_STD):
    """Drop the code dims whose train-split std (ddof=1) is below `threshold` (0.05) from z_train and from
    every other array (same columns). Returns (kept_dims, z_train_pruned, *others_pruned)."""
    z_train = _codes(z_train, "z_train", 1, allow_constant=True)
    kept = np.setdiff1d(np.arange(z_train.shape[1]), inactive_dims(z_train, threshold))
    if len(kept) == 0:
        raise ValueError(f"prune_inactive: all {z_train.shape[1]} dims have std < {threshold} on the train split "
                         f"(collapsed model)")
    out = [kept, z_train[:, kept]]
    for i, z in enumerate(others):
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != z_train.shape[1]:
            raise ValueError(f"array {i + 1} after z_train has shape {z.shape}, need (n, {z_train.shape[1]})")
        out.append(z[:, kept])
    return tuple(out)


def name_dims(importance, factor_names):
    """Name each code dim after the source factor it encodes best (argmax of its DCI importance row).

    importance: (d, K) DCI importance matrix (codes × factors). When several dims pick the same factor, the
    most important keeps the plain name and the others get "name#2", "name#3", … (by decreasing importance).
    A dim with zero importance for every factor is called "dim<i>". Exact ties go to the first factor.
    """
    R = np.asarray(importance, dtype=np.float64)
    names = [str(n) for n in factor_names]
    if R.ndim != 2 or R.shape[1] != len(names):
        raise ValueError(f"importance has shape {R.shape} but there are {len(names)} factor names; "
                         f"pass the (codes × factors) DCI importance")
    if not np.all(np.isfinite(R)):
        raise ValueError("importance contains NaN or inf")
    out = [f"dim{i}" for i in range(R.shape[0])]
    best = R.argmax(axis=1)
    for f, name in enumerate(names):
        dims = [i for i in range(R.shape[0]) if best[i] == f and R[i, f] > 0]
        for rank, i in enumerate(sorted(dims, key=lambda i: (-R[i, f], i))):
            out[i] = name if rank == 0 else f"{name}#{rank + 1}"
    return out


def latent_gallery(z, dims, n=9):
    """What a code dim means, as images to show (paper Sec. IV, interpretability): for each dim d of `dims`,
    the rows of z nearest to n evenly spaced quantiles of z[:, d] (its minimum, ..., its maximum). Returns
    (index (len(dims), n) rows of z, ordered from the lowest to the highest value; values (len(dims), n))."""
    z = _codes(z, "z", 1, allow_constant=True)
    dims = np.asarray(dims, np.int64)
    col = z[:, dims]                                                       # (rows, len(dims))
    targets = np.quantile(col, np.linspace(0.0, 1.0, n), axis=0).T        # (len(dims), n)
    index = np.abs(col.T[:, None, :] - targets[:, :, None]).argmin(axis=2)  # nearest row to each quantile
    return index, np.take_along_axis(col.T, index, axis=1)


def correlations(z, features):
    """Pearson r and two-sided p-value of every (code dim, feature) pair (paper Fig. 6).

    z (n, d); features: dict name -> array (n,). Returns {dim: {feature: {"r": r, "p": p}}} (dim = column
    index of z). A constant column has no correlation: r = 0, p = 1 and a warning names it.
    """
    z = _codes(z, "z", 1, allow_constant=True)
    if len(z) < 3:
        raise ValueError(f"correlations needs at least 3 codes, got {len(z)}")
    cols = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in features.items()}
    for name, v in cols.items():
        if len(v) != len(z):
            raise ValueError(f"feature {name!r} has {len(v)} values but there are {len(z)} codes")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"feature {name!r} contains NaN or inf")
    out = {d: {} for d in range(z.shape[1])}
    for d, name in itertools.product(out, cols):
        if np.ptp(z[:, d]) == 0 or np.ptp(cols[name]) == 0:
            warnings.warn(f"correlations: {'code dim ' + str(d) if np.ptp(z[:, d]) == 0 else name!r} is constant; "
                          f"r set to 0, p to 1")
            out[d][name] = {"r": 0.0, "p": 1.0}
        else:
            r, p = scipy.stats.pearsonr(z[:, d], cols[name])
            out[d][name] = {"r": float(r), "p": float(p)}
    return out


def clustering_scores(z, y, seed=0):
    """K-Means (k = number of classes present in y, n_init=10, random_state=seed) on the codes.

    Returns dict(k, ami = adjusted mutual information between clusters and classes, silhouette = silhouette of
    the K-Means clusters, silhouette_classes = silhouette of the true classes). Silhouettes use Euclidean
    distance on at most 10,000 samples (a seeded subsample above that).
    """
    z, y = _xy(z, y, "clustering")
    k = len(np.unique(y))
    if k < 2 or k >= len(z):
        raise ValueError(f"clustering_scores needs 2 <= #classes < #samples, got {k} classes, {len(z)} samples")
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    if len(np.unique(pred)) < 2:
        raise ValueError("clustering_scores: K-Means found a single cluster (codes almost identical)")
    sample = min(len(z), 10000) if len(z) > 10000 else None
    return dict(k=k, ami=float(adjusted_mutual_info_score(y, pred)),
                silhouette=float(silhouette_score(z, pred, sample_size=sample, random_state=seed)),
                silhouette_classes=float(silhouette_score(z, y, sample_size=sample, random_state=seed)))


def open_set(z_train, y_train, z_test, y_test, holdout_label, k=5, quantile=0.95, seed=0):
    """Open-set analysis of a class left out of training (paper §IV).

    Known = every class except `holdout_label`; training samples of the held-out class, if any, are ignored.
    - Novelty score = mean Euclidean distance to the k (5) nearest known training codes. Threshold = the
      `quantile` (0.95) quantile of the leave-one-out score of the training codes; above it = "unknown".
      (Official J:open_set.py queries the training codes with themselves, so each point's own distance 0
      is one of its 5; leaving it out makes train and test scores comparable.)
      detection_rate = share of held-out test samples above it, false_alarm_rate = share of known test
      samples above it, auroc = ROC AUC of the score for held-out (1) vs known (0) test samples.
    - Where the held-out samples go: the downstream GBT (lr 0.1, depth 4, random_state=seed) trained on the
      known classes predicts them; predicted_counts = {class: count}, assigned = the most frequent class.
    - Per-dim distances: centroid_distance[c] = mean over held-out samples of |z − centroid_c| (centroids of
      the known classes on train), centroid_distance_assigned = that row for `assigned` (paper Fig. 7).
    """
    z_train, y_train = _xy(z_train, y_train, "train")
    z_test, y_test = _xy(z_test, y_test, "test")
    if z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"z_train has {z_train.shape[1]} dims but z_test has {z_test.shape[1]}")
    if not 0 < quantile < 1 or int(k) < 1:
        raise ValueError(f"open_set needs 0 < quantile < 1 and k >= 1, got quantile={quantile}, k={k}")
    keep = y_train != holdout_label
    z_known, y_known = z_train[keep], y_train[keep]
    held, known_test = y_test == holdout_label, y_test != holdout_label
    if held.sum() == 0:
        raise ValueError(f"open_set: no test sample has the held-out label {holdout_label!r}")
    if known_test.sum() == 0:
        raise ValueError("open_set: the test split has no sample of a known class (needed for false alarms)")
    classes = np.unique(y_known)
    if len(classes) < 2 or len(z_known) <= k:
        raise ValueError(f"open_set needs >= 2 known classes and more than k={k} known training samples")

    nn = NearestNeighbors(n_neighbors=k + 1).fit(z_known)
    loo = nn.kneighbors(z_known, n_neighbors=k + 1)[0][:, 1:].mean(axis=1)  # drop the sample itself
    threshold = float(np.quantile(loo, quantile))
    score = nn.kneighbors(z_test, n_neighbors=k)[0].mean(axis=1)
    pred = _downstream_gbt(seed).fit(z_known, y_known).predict(z_test[held])
    labels, counts = np.unique(pred, return_counts=True)
    assigned = labels[np.argmax(counts)]
    centroids = np.stack([z_known[y_known == c].mean(axis=0) for c in classes])
    dist = np.stack([np.abs(z_test[held] - m).mean(axis=0) for m in centroids])
    return dict(threshold=threshold,
                detection_rate=float(np.mean(score[held] > threshold)),
                false_alarm_rate=float(np.mean(score[known_test] > threshold)),
                auroc=float(roc_auc_score(held.astype(int), score)),
                predicted_counts=dict(zip(labels.tolist(), counts.tolist())),
                assigned=assigned.item(), known_classes=classes.tolist(),
                centroid_distance=dist, centroid_distance_assigned=dist[np.searchsorted(classes, assigned)],
                n_holdout=int(held.sum()), n_known_test=int(known_test.sum()))
