"""Tests of DCI, MIG, OMES and the target metrics on constructed cases with known answers (metrics.py)."""

import numpy as np
import pytest
from scipy.stats import special_ortho_group

import metrics


SIZES = (5, 7, 3, 6, 40)  # Texture-dSprites factor sizes


def fake_encoder(sizes, d=10, seed=0, mix=0.3, noise=0.05):
    """Nonlinear 10-dim code: dim k mostly encodes factor k, some mixing, 2 nuisance dims, 3 inactive dims."""
    rng = np.random.default_rng(seed)
    K = len(sizes)
    W = np.zeros((K, d))
    W[:, :K] = np.eye(K) + mix * rng.normal(size=(K, K))
    W[:, K:K + 2] = rng.normal(size=(K, 2))
    P = 37 * rng.normal(size=(K, d))
    amp = np.where(np.arange(d) < K + 2, noise, 0.01)     # last d - K - 2 dims: std 0.01, inactive
    sizes = np.asarray(sizes)

    def encode(f):
        x = (np.asarray(f) + 0.5) / sizes - 0.5
        x = np.where(sizes == 40, np.cos(2 * np.pi * x), x)   # orientation is cyclic
        h = np.tanh(2 * x @ W)
        wobble = np.sqrt(2) * np.sin(np.asarray(f) @ P)   # pseudo-random, std 1, a fixed function of the image
        return h + wobble * amp
    return encode


def grid(sizes, n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, n) for s in sizes], axis=1)


def standardise(y):
    return (y - y.mean(0)) / y.std(0)


def full_grid(sizes):
    """Every point of a factor grid, in C order (the order grid_relation_matrix expects)."""
    return np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), 1).astype(np.float64)


def omes_of_grid(z, sizes):
    return metrics.omes_from_relation(metrics.grid_relation_matrix(z, sizes))[0]


def relation_of_pairs(za, zb, f):
    """The official OMES relation matrix from an explicit list of pairs, the oracle of grid_relation_matrix:
    M[d, k] = 1 − |Pearson r of za[:, d] and zb[:, d]| over the pairs whose changed factor is k."""
    return np.array([[1 - abs(np.corrcoef(za[f == k, d], zb[f == k, d])[0, 1]) for k in np.unique(f)]
                     for d in range(za.shape[1])])


@pytest.mark.parametrize("R, D, C", [
    (np.eye(3), 1.0, 1.0),
    (np.ones((3, 3)), 0.0, 0.0),
    ([[1, 0], [1, 0]], 1.0, 0.0),
    ([[.9, .1], [.1, .9], [0, 0], [0, 0]], 0.531004, 0.765502),
])
def test_dci_reference_vectors(R, D, C):
    d, c, _, _ = metrics.dci_from_importance(R)
    assert d == pytest.approx(D, abs=1e-6)
    assert c == pytest.approx(C, abs=1e-6)


def test_mig_reference_vectors():
    g = np.array([(a, b) for a in range(4) for b in range(4)])  # 4x4 full-factorial design
    assert metrics.mig(g, g) == pytest.approx(1.0)
    assert metrics.mig(g[:, ::-1] * [2.5, 0.3] + [1.0, -7.0], g) == pytest.approx(1.0)  # swapped + affine
    assert metrics.mig(np.stack([g[:, 0], g[:, 0]], 1), g) == pytest.approx(0.0)       # factor 0 twice


def test_histogram_discretize_matches_disentanglement_lib():
    z = np.array([[0.0], [0.5], [1.0], [0.04], [0.96]])
    b = metrics.histogram_discretize(z, 20)[:, 0]
    assert b.tolist() == [1, 11, 20, 1, 20]  # 1..20, the max falls in bin 20


SMALL_GBT = (2, 3, 4)  # 1 + 3 + 4 trees per boosting stage: keeps the GBT fits fast


def small_split(seed=0, n_train=400, n_test=200):
    return grid(SMALL_GBT, n_train, seed), grid(SMALL_GBT, n_test, seed + 100)


def test_codes_equal_factors_score_one():
    y_tr, y_te = small_split()
    d = metrics.dci(y_tr.astype(float), y_tr, y_te.astype(float), y_te, n_jobs=1)
    assert d["disentanglement"] > 0.97 and d["completeness"] > 0.97
    assert d["informativeness_train"] == 1.0 and d["informativeness_test"] == 1.0
    assert np.argmax(d["importance"], axis=0).tolist() == [0, 1, 2]
    assert metrics.mig(y_tr, y_tr) == pytest.approx(1.0, abs=0.02)  # < 1 only by sampling noise
    full = full_grid(SMALL_GBT)
    np.testing.assert_array_equal(metrics.grid_relation_matrix(full, SMALL_GBT), np.eye(3))
    assert omes_of_grid(full, SMALL_GBT) == 1.0


def test_rotation_scores_clearly_lower():
    y_tr, y_te = small_split()
    Q = special_ortho_group.rvs(3, random_state=1)

    def rot(y):
        return standardise(y.astype(float)) @ Q
    d_id = metrics.dci(y_tr.astype(float), y_tr, y_te.astype(float), y_te, n_jobs=1)
    d_rot = metrics.dci(rot(y_tr), y_tr, rot(y_te), y_te, n_jobs=1)
    assert d_rot["disentanglement"] < d_id["disentanglement"] - 0.3
    assert d_rot["completeness"] < d_id["completeness"] - 0.3
    assert metrics.mig(rot(y_tr), y_tr) < 0.5
    assert omes_of_grid(rot(full_grid(SMALL_GBT)), SMALL_GBT) < 0.7


def test_independent_codes_score_near_zero():
    y_tr, y_te = small_split()
    rng = np.random.default_rng(3)
    z_tr, z_te = rng.normal(size=(len(y_tr), 3)), rng.normal(size=(len(y_te), 3))
    d = metrics.dci(z_tr, y_tr, z_te, y_te, n_jobs=1)
    assert d["disentanglement"] < 0.15 and d["completeness"] < 0.15
    assert metrics.mig(z_tr, y_tr) < 0.03
    # Codes that ignore every factor: constant over the grid -> M = 0 -> OMES = 0.
    assert omes_of_grid(np.ones((24, 3)), SMALL_GBT) == 0.0
    # Fresh noise for every image of a 20×20×20 grid: M ≈ 1 − 1/20 everywhere, OMES near its chance level
    # (1/K + 1/d) / 2 = 1/3.
    assert omes_of_grid(rng.normal(size=(8000, 3)), (20, 20, 20)) == pytest.approx(0.95 / 3, abs=0.02)


def test_invariance_to_permutation_and_positive_rescaling():
    y_tr, y_te = small_split()
    enc = fake_encoder(SMALL_GBT, d=5, mix=0.5)
    z_tr, z_te = enc(y_tr), enc(y_te)
    perm, scale = np.array([3, 0, 4, 1, 2]), np.array([2.0, 0.5, 4.0, 1.0, 8.0])

    def t(z):
        return z[:, perm] * scale[perm]
    a = metrics.dci(z_tr, y_tr, z_te, y_te, n_jobs=1)
    s = metrics.dci(z_tr * [2.3, 0.7, 3.1, 1.0, 9.9], y_tr, z_te * [2.3, 0.7, 3.1, 1.0, 9.9], y_te, n_jobs=1)
    for key in ("disentanglement", "completeness", "informativeness_test"):   # rescaling: exactly equal
        assert s[key] == a[key]
    # Permutation: equal up to the GBT's tie-breaking between features that give the same split (it visits
    # features in a seeded random order); measured differences <= 0.03 on this small case.
    b = metrics.dci(t(z_tr), y_tr, t(z_te), y_te, n_jobs=1)
    for key in ("disentanglement", "completeness", "informativeness_test"):
        assert b[key] == pytest.approx(a[key], abs=0.04)
    np.testing.assert_allclose(b["importance"], a["importance"][perm], atol=0.06)
    assert metrics.mig(t(z_tr), y_tr) == pytest.approx(metrics.mig(z_tr, y_tr), abs=1e-12)
    z = enc(full_grid(SMALL_GBT))
    ma, mb = metrics.grid_relation_matrix(z, SMALL_GBT), metrics.grid_relation_matrix(t(z), SMALL_GBT)
    np.testing.assert_allclose(mb, ma[perm], atol=1e-4)
    assert omes_of_grid(t(z), SMALL_GBT) == pytest.approx(omes_of_grid(z, SMALL_GBT), abs=1e-4)
    assert 0.2 < omes_of_grid(z, SMALL_GBT) < 0.95  # a non-trivial case


def test_omes_relation_matrix_by_hand():
    """3 dims, 2 factors, 4 pairs each, correlations chosen exactly (r = 0, 0.6, 1)."""
    x = np.array([1.0, 2.0, 3.0, 4.0])
    r0, r06 = np.array([1.0, 2.0, 2.0, 1.0]), np.array([2.0, 1.0, 4.0, 3.0])  # r(x, .) = 0 and 0.6
    za = np.concatenate([np.stack([x, x, x], 1), np.stack([x, x, x], 1)])
    zb = np.concatenate([np.stack([r0, r06, x], 1),      # factor 0: dim0 r=0, dim1 r=.6, dim2 r=1
                         np.stack([x, x, r0], 1)])       # factor 1: dim0 r=1, dim1 r=1, dim2 r=0
    M = relation_of_pairs(za, zb, np.repeat([0, 1], 4))
    np.testing.assert_allclose(M, [[1, 0], [0.4, 0], [0, 1]], atol=1e-12)
    # By hand: O = [[1,0],[.7,.3],[0,1]], E = [[13/15,1/3],[7/15,1/3],[.2,1]]
    # OS_0 = (1 + .16*.7)/1.4, ME_0 = (13/15 + .16*7/15)/1.4, OS_1 = ME_1 = 1 -> OMES = 13/15
    score, modularity, compactness, per_factor = metrics.omes_from_relation(M)
    assert modularity == pytest.approx((1.112 / 1.4 + 1) / 2)
    assert compactness == pytest.approx(((13 / 15 + 0.16 * 7 / 15) / 1.4 + 1) / 2)
    assert score == pytest.approx(13 / 15)
    np.testing.assert_allclose(per_factor, [11 / 15, 1.0])
    assert metrics.omes_from_relation(M, pooling="max")[0] == pytest.approx((0.5 * (1 + 13 / 15) + 1) / 2)
    assert metrics.omes_from_relation(M, alpha=1.0)[0] == pytest.approx(modularity)
    # A factor no dim responds to scores 0 (the official code divides by zero there).
    assert metrics.omes_from_relation([[1, 0], [0, 0]])[0] == pytest.approx(0.5)


def test_omes_drops_inactive_dims(monkeypatch):
    """A dim whose std is below 0.05 is left out of OMES: here the only dim that encodes factor 1."""
    monkeypatch.setattr(metrics, "dci", lambda *a, **k: {})
    monkeypatch.setattr(metrics, "mig", lambda *a, **k: 0.0)
    z = full_grid((4, 3)) * [1.0, 0.01]
    o = metrics.disentanglement_scores(z, (4, 3), n_train=100, n_test=50)["omes"]
    assert o["active"].tolist() == [0] and o["relation"].tolist() == [[1, 0], [0, 1]]
    # Left: M = [[1, 0]] -> factor 0 scores 1, factor 1 is encoded by no active dim and scores 0.
    assert o["omes"] == pytest.approx(0.5)
    assert metrics.inactive_dims(z).tolist() == [1]
    with pytest.raises(ValueError, match="inactive"):
        metrics.disentanglement_scores(z * 1e-3, (4, 3), n_train=100, n_test=50)


def test_edge_cases_raise_clear_errors():
    y_tr, y_te = small_split(n_train=200, n_test=100)
    z_tr, z_te = y_tr.astype(float), y_te.astype(float)
    with pytest.raises(ValueError, match="rows but the codes have"):
        metrics.dci(z_tr, y_tr[:-1], z_te, y_te)
    with pytest.raises(ValueError, match="rows but the codes have"):
        metrics.mig(z_tr, y_tr[:-1])
    with pytest.raises(ValueError, match="need at least 2"):
        metrics.mig(z_tr[:, :1], y_tr)
    with pytest.raises(ValueError, match="need at least 2"):
        metrics.dci(z_tr[:, :1], y_tr, z_te[:, :1], y_te)
    bad = z_tr.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in code dim"):
        metrics.mig(bad, y_tr)
    bad[5, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.dci(bad, y_tr, z_te, y_te)
    with pytest.raises(ValueError, match="every code dim is constant"):
        metrics.mig(np.ones_like(z_tr), y_tr)
    with pytest.raises(ValueError, match="every code dim is constant"):
        metrics.dci(np.ones_like(z_tr), y_tr, z_te, y_te)
    y_single = y_tr.copy()
    y_single[:, 2] = 0
    with pytest.raises(ValueError, match="single value in the training split"):
        metrics.dci(z_tr, y_single, z_te, y_te)
    with pytest.raises(ValueError, match="alpha"):
        metrics.omes_from_relation(np.eye(2), alpha=2)
    with pytest.raises(ValueError, match="pooling"):
        metrics.omes_from_relation(np.eye(2), pooling="mean")
    with pytest.raises(ValueError, match="prod"):
        metrics.grid_relation_matrix(z_tr[:20], SMALL_GBT)


def test_constant_factor_is_skipped_with_warning():
    y_tr, y_te = small_split(n_train=300, n_test=150)
    y3_tr = np.column_stack([y_tr, np.full(len(y_tr), 7)])
    y3_te = np.column_stack([y_te, np.full(len(y_te), 7)])
    z_tr, z_te = y_tr.astype(float), y_te.astype(float)
    with pytest.warns(UserWarning, match="factor 3 is constant"):
        m = metrics.mig(z_tr, y3_tr)
    assert m == pytest.approx(metrics.mig(z_tr, y_tr))
    with pytest.warns(UserWarning, match="factor 3 is constant"):
        d = metrics.dci(z_tr, y3_tr, z_te, y3_te, n_jobs=1)
    ref = metrics.dci(z_tr, y_tr, z_te, y_te, n_jobs=1)
    assert d["factors_used"] == [0, 1, 2]
    assert d["disentanglement"] == pytest.approx(ref["disentanglement"])
    assert d["importance"].shape == (3, 4) and np.all(d["importance"][:, 3] == 0)
    assert all(np.isfinite(v) for v in (d["disentanglement"], d["completeness"], m))


def test_constant_code_dim_is_allowed():
    y_tr, y_te = small_split(n_train=300, n_test=150)
    z_tr = np.column_stack([y_tr.astype(float), np.zeros(len(y_tr))])
    z_te = np.column_stack([y_te.astype(float), np.zeros(len(y_te))])
    d = metrics.dci(z_tr, y_tr, z_te, y_te, n_jobs=1)
    assert np.all(d["importance"][3] == 0) and d["disentanglement"] > 0.97
    assert metrics.mig(z_tr, y_tr) == pytest.approx(metrics.mig(z_tr[:, :3], y_tr))


def test_non_integer_labels_are_encoded():
    y_tr, y_te = small_split(n_train=300, n_test=150)
    z_tr, z_te = y_tr + 0.1 * np.random.default_rng(0).normal(size=y_tr.shape), y_te.astype(float)
    names = np.array(["a", "b", "c", "d", "e"])
    scales = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    lab_tr = np.column_stack([names[y_tr[:, 0]], scales[y_tr[:, 1]], y_tr[:, 2] * 10]).astype(object)
    lab_te = np.column_stack([names[y_te[:, 0]], scales[y_te[:, 1]], y_te[:, 2] * 10]).astype(object)
    lab_tr = np.array(lab_tr.tolist(), dtype=str)
    lab_te = np.array(lab_te.tolist(), dtype=str)
    a = metrics.dci(z_tr, y_tr, z_te, y_te, n_jobs=1)
    b = metrics.dci(z_tr, lab_tr, z_te, lab_te, n_jobs=1)
    assert b["disentanglement"] == pytest.approx(a["disentanglement"])
    assert b["informativeness_test"] == pytest.approx(a["informativeness_test"])
    assert metrics.mig(z_tr, lab_tr) == pytest.approx(metrics.mig(z_tr, y_tr))


def test_grid_relation_matrix_equals_all_pairs():
    """The exact grid matrix equals the official relation matrix on the explicit list of every pair of the grid."""
    sizes = (2, 3, 4)
    full = full_grid(sizes).astype(np.int64)
    z = fake_encoder(sizes, d=6, mix=0.8)(full)
    for pairs in ("resample", "differ"):
        za, zb, f = [], [], []
        for i, x in enumerate(full):
            for k, s in enumerate(sizes):
                for v in range(s):
                    if pairs == "differ" and v == x[k]:
                        continue
                    y = x.copy()
                    y[k] = v
                    za.append(z[i])
                    zb.append(z[np.ravel_multi_index(y, sizes)])
                    f.append(k)
        M = relation_of_pairs(np.array(za), np.array(zb), np.array(f))
        np.testing.assert_allclose(metrics.grid_relation_matrix(z, sizes, pairs), M, atol=1.01e-4)
    # "differ" on a perfect linear code of a 3-valued factor: r = -1/2 -> M = 0.5 (why "resample" is default)
    M = metrics.grid_relation_matrix(full[:, [1]].astype(float), sizes, "differ")
    np.testing.assert_allclose(M, [[0, 0.5, 0]])


def grid_codes(encoder, sizes):
    """The codes of every point of a factor grid, in C order."""
    return encoder(full_grid(sizes))


def test_disentanglement_scores_look_up_the_samples_in_the_grid():
    sizes = (3, 4, 1, 5)     # factor 2 has a single value: skipped by DCI/MIG, no OMES pairs
    enc = fake_encoder(sizes, d=6)
    with pytest.warns(UserWarning, match="factor 2 is constant"):
        r = metrics.disentanglement_scores(grid_codes(enc, sizes), sizes, n_train=700, n_test=300, seed=0, n_jobs=1)
    assert r["omes"]["factors"] == [0, 1, 3] and r["omes"]["pairs"] == "all"
    assert r["dci"]["importance"].shape == (6, 4) and r["dci"]["factors_used"] == [0, 1, 3]
    assert 0.3 < r["dci"]["disentanglement"] < 1 and 0.2 < r["mig"] < 1 and 0.2 < r["omes"]["omes"] < 1
    # MIG of the seeded factor rows, looked up in the grid's codes
    rng = np.random.default_rng(0)
    f_train = np.stack([rng.integers(0, s, 700) for s in sizes], 1)
    with pytest.warns(UserWarning, match="factor 2 is constant"):
        assert r["mig"] == pytest.approx(metrics.mig(enc(f_train.astype(np.float64)), f_train))
    # A permuted, rescaled copy of the model gets the same MIG and OMES.
    with pytest.warns(UserWarning):
        r2 = metrics.disentanglement_scores(grid_codes(enc, sizes)[:, ::-1] * 3, sizes, n_train=700, n_test=300,
                                            seed=0, n_jobs=1)
    assert r2["mig"] == pytest.approx(r["mig"]) and r2["omes"]["omes"] == pytest.approx(r["omes"]["omes"])
    with pytest.raises(ValueError, match="all 60 grid points"):
        metrics.disentanglement_scores(grid_codes(enc, sizes)[:50], sizes, n_train=20, n_test=10)


def test_omes_is_exact_and_the_same_for_every_seed(monkeypatch):
    """Every pair of the Texture-dSprites grid (25,200 points) is scored: OMES has no seed noise (DCI/MIG stubbed
    out: only OMES is run)."""
    monkeypatch.setattr(metrics, "dci", lambda *a, **k: {})
    monkeypatch.setattr(metrics, "mig", lambda *a, **k: 0.0)
    z_grid = grid_codes(fake_encoder(SIZES), SIZES)
    runs = [metrics.disentanglement_scores(z_grid, SIZES, seed=s) for s in range(3)]
    assert max(r["omes"]["omes"] for r in runs) - min(r["omes"]["omes"] for r in runs) < 1e-12
    assert 0.3 < runs[0]["omes"]["omes"] < 0.9


def clusters(n_per, centres, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, dtype=float)
    z = np.concatenate([c + spread * rng.normal(size=(n_per, centres.shape[1])) for c in centres])
    return z, np.repeat(np.arange(len(centres)), n_per)


CENTRES = [[0, 0, 0], [4, 0, 0], [0, 4, 0], [4, 4, 0]]   # separable along dims 0 and 1, dim 2 is noise


def test_downstream_accuracy_separable():
    z_tr, y_tr = clusters(60, CENTRES, 0)
    z_te, y_te = clusters(30, CENTRES, 1)
    r = metrics.downstream_accuracy(z_tr, y_tr, z_te, y_te, seed=0)
    # (GBT with 100 depth-4 trees overfits 240 points a little: a few test points off the training range)
    assert r["gbt"] >= 0.95 and r["mlp"] == 1.0 and r["gbt_balanced"] >= 0.95 and r["mlp_balanced"] == 1.0
    assert r["gbt_importance"].sum() == pytest.approx(1.0) and r["gbt_importance"][2] < 0.05
    r2 = metrics.downstream_accuracy(z_tr, y_tr, z_te, y_te, seed=0)
    assert r2["mlp"] == r["mlp"] and np.array_equal(r2["gbt_importance"], r["gbt_importance"])
    # Unbalanced test set where the classifier always says class 0: accuracy 0.75, balanced accuracy 0.5.
    z_tr2, y_tr2 = clusters(40, [[0, 0], [8, 8]], 2)
    z_te2 = np.zeros((8, 2))
    y_te2 = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    r3 = metrics.downstream_accuracy(z_tr2, y_tr2, z_te2, y_te2, seed=0)
    assert r3["gbt"] == 0.75 and r3["gbt_balanced"] == 0.5


def test_prune_inactive():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(100, 4))
    z[:, 1] *= 0.01
    other = rng.normal(size=(7, 4))
    kept, a, b = metrics.prune_inactive(z, other)
    assert kept.tolist() == [0, 2, 3]
    assert np.array_equal(a, z[:, [0, 2, 3]]) and np.array_equal(b, other[:, [0, 2, 3]])
    with pytest.raises(ValueError, match="collapsed"):
        metrics.prune_inactive(z * 1e-3)
    with pytest.raises(ValueError, match="shape"):
        metrics.prune_inactive(z, other[:, :3])


def test_name_dims():
    names = ("texture", "colour", "shape", "scale", "orientation")
    R = np.array([[0.1, 0.0, 0.0, 0.9, 0.0],     # scale (second best)  -> scale#2
                  [0.0, 0.0, 0.0, 0.0, 0.0],     # nothing              -> dim1
                  [0.8, 0.1, 0.1, 0.0, 0.0],     # texture
                  [0.0, 0.05, 0.0, 0.95, 0.0],   # scale (best)
                  [0.0, 0.3, 0.3, 0.0, 0.4],     # orientation
                  [0.0, 0.5, 0.5, 0.0, 0.0]])    # tie colour/shape -> first: colour
    assert metrics.name_dims(R, names) == ["scale#2", "dim1", "texture", "scale", "orientation", "colour"]
    with pytest.raises(ValueError, match="factor names"):
        metrics.name_dims(R, names[:4])


def test_correlations():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 3))
    feats = {"area": 3 * z[:, 0] + 1, "red": -0.5 * z[:, 2], "noise": rng.normal(size=50)}
    c = metrics.correlations(z, feats)
    assert c[0]["area"]["r"] == pytest.approx(1.0) and c[0]["area"]["p"] < 1e-10
    assert c[2]["red"]["r"] == pytest.approx(-1.0)
    assert abs(c[1]["noise"]["r"]) < 0.5 and 0 < c[1]["noise"]["p"] <= 1
    with pytest.warns(UserWarning, match="constant"):
        c2 = metrics.correlations(np.column_stack([z[:, 0], np.ones(50)]), {"area": feats["area"]})
    assert c2[1]["area"] == {"r": 0.0, "p": 1.0}
    with pytest.raises(ValueError, match="values but there are"):
        metrics.correlations(z, {"area": np.ones(49)})


def test_clustering_scores():
    z, y = clusters(50, CENTRES, 0, spread=0.2)
    r = metrics.clustering_scores(z, y, seed=0)
    assert r["ami"] == pytest.approx(1.0) and r["silhouette"] > 0.8 and r["silhouette_classes"] > 0.8
    rng = np.random.default_rng(1)
    r2 = metrics.clustering_scores(rng.normal(size=(200, 3)), rng.integers(0, 4, 200), seed=0)
    assert abs(r2["ami"]) < 0.05 and r2["silhouette_classes"] < 0.05
    with pytest.raises(ValueError, match="classes"):
        metrics.clustering_scores(z, np.zeros(len(z)))


def test_open_set_far_cluster():
    known = [[0, 0, 0], [3, 0, 0], [0, 3, 0]]
    z_tr, y_tr = clusters(80, known, 0)
    z_te, y_te = clusters(40, known + [[3, 0, 8]], 1)   # class 3 held out: class 1 + 8 along dim 2
    r = metrics.open_set(z_tr, y_tr, z_te, y_te, holdout_label=3, k=5, quantile=0.95, seed=0)
    assert r["detection_rate"] == 1.0 and r["auroc"] == pytest.approx(1.0)
    assert r["false_alarm_rate"] < 0.15
    assert r["assigned"] == 1 and r["known_classes"] == [0, 1, 2] and r["n_holdout"] == 40
    assert sum(r["predicted_counts"].values()) == 40
    d = r["centroid_distance_assigned"]          # per-dim mean |z - centroid of class 1|
    assert d[2] == pytest.approx(8.0, abs=0.2) and d[0] < 0.5 and d[1] < 0.5
    assert r["centroid_distance"].shape == (3, 3)
    # Held-out samples inside a known cluster cannot be detected: AUROC ≈ 0.5.
    z_te2, y_te2 = clusters(40, known + [[3, 0, 0]], 1)
    r2 = metrics.open_set(z_tr, y_tr, z_te2, y_te2, holdout_label=3)
    assert 0.3 < r2["auroc"] < 0.7 and r2["detection_rate"] < 0.3
    with pytest.raises(ValueError, match="held-out label"):
        metrics.open_set(z_tr, y_tr, z_te, y_te, holdout_label=9)
