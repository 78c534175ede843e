"""Tests of Texture-dSprites, the pair sampler, image reading, synthetic-cells, handcrafted features (data.py)."""
import time

import numpy as np
import pytest
from PIL import Image

import data
import folders


@pytest.fixture(scope="module")
def ds():
    return data.TextureDSprites()


def test_factor_grid_and_values(ds):
    assert ds.factor_names == ("texture", "colour", "shape", "scale", "orientation")
    assert ds.factor_sizes == (5, 7, 3, 6, 40)
    assert len(ds) == 25200
    np.testing.assert_allclose(data.SCALES, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    o = data.ORIENTATIONS
    assert len(o) == 40 and o[0] == 0 and np.isclose(o[-1], 2 * np.pi)  # dSprites keeps both ends


def test_factor_index_round_trip(ds):
    idx = np.arange(len(ds))
    f = ds.index_to_factors(idx)
    assert f.dtype == np.int64 and f.shape == (25200, 5)
    np.testing.assert_array_equal(ds.factors_to_index(f), idx)
    # mixed radix in FACTOR_NAMES order: orientation is the fastest digit
    np.testing.assert_array_equal(ds.index_to_factors([0, 1, 40, 240, 720, 5040, 25199]),
                                  [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0],
                                   [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [4, 6, 2, 5, 39]])
    assert len(np.unique(f, axis=0)) == 25200
    with pytest.raises(ValueError):
        ds.index_to_factors([25200])
    with pytest.raises(ValueError):
        ds.factors_to_index([[0, 7, 0, 0, 0]])


def test_render_shape_values_and_background(ds):
    x = ds.images(np.arange(0, 25200, 97))
    assert x.dtype == np.uint8 and x.shape == (len(range(0, 25200, 97)), 64, 64, 3)
    assert (x[:, :2].max() == 0) and (x[:, :, :2].max() == 0)    # black border
    # centre pixel of the big square (orientation 0): mask = 1, so pixel = colour × texture × 255
    for t, c in [(0, 0), (2, 3), (4, 6)]:
        img = ds.render([[t, c, 0, 5, 0]])[0]
        want = np.round(ds.colours[c] * ds.textures[t, 32, 32] * 255 + 1e-9)
        np.testing.assert_allclose(img[32, 32], want, atol=1)
    # scale grows the object's area by ~ scale² (0.5 → 1: ×4)
    a = [ds.render([[0, 0, 0, s, 0]])[0].max(2).astype(bool).sum() for s in (0, 5)]
    assert 3.4 < a[1] / a[0] < 4.6
    # anti-aliased edges: some pixels strictly between 0 and full value
    m = ds.masks
    assert m.shape == (720, 64, 64) and ((m > 0.05) & (m < 0.95)).any()


def test_every_factor_changes_the_image(ds):
    base = np.array([1, 2, 1, 3, 7])
    ref = ds.render(base[None])[0]
    for k, size in enumerate(ds.factor_sizes):
        for v in range(size):
            if v == base[k]:
                continue
            f = base.copy()
            f[k] = v
            img = ds.render(f[None])[0]
            assert np.abs(img.astype(int) - ref).sum() > 0, (k, v)
    # documented dSprites quirk: orientation 0 and 39 (0 and 2π) are the same picture
    np.testing.assert_array_equal(ds.render([[0, 0, 2, 5, 0]]), ds.render([[0, 0, 2, 5, 39]]))


def test_colours_equal_lightness_and_textures_distinct(ds):
    c = ds.colours.astype(np.float64)
    assert c.shape == (7, 3) and np.all(c[0] == 1)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    lstar = 116 * np.cbrt(y) - 16
    np.testing.assert_allclose(lstar[1:], 70.0, atol=0.3)          # six hues, equal L*
    assert len(np.unique(np.round(c, 2), axis=0)) == 7
    t = ds.textures
    assert t.shape == (5, 64, 64) and t.min() >= 0.35 - 1e-6 and t.max() <= 1 + 1e-6
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(t[i] - t[j]).mean() > 0.1, (i, j)


def test_determinism_and_digest(ds):
    other = data.TextureDSprites()
    idx = np.array([0, 123, 9999, 25199])
    np.testing.assert_array_equal(ds.images(idx), other.images(idx))
    assert ds.digest == other.digest and len(ds.digest) == 64


def _write_gray(path, arr):
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_textures_folder(tmp_path):
    d = tmp_path / "tex"
    d.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        _write_gray(d / f"D{k}.png", rng.integers(0, 256, (80, 100)))
    with pytest.raises(ValueError, match="has 3 images, need 5"):
        data.TextureDSprites(textures=str(d))
    with pytest.raises(FileNotFoundError):
        data.TextureDSprites(textures=str(tmp_path / "nope"))
    # RGB and gray files, non-square: gray + centre crop + resize; six files → first five + warning
    Image.fromarray(np.full((60, 90, 3), 200, np.uint8)).save(d / "D3.tif")
    _write_gray(d / "D4.png", np.full((64, 64), 128))
    _write_gray(d / "D5.png", np.zeros((64, 64)))
    (d / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="first five"):
        t = data.TextureDSprites(textures=str(d))
    assert t.textures.shape == (5, 64, 64)
    np.testing.assert_allclose(t.textures[3], 200 / 255, atol=1e-6)
    np.testing.assert_allclose(t.textures[4], 128 / 255, atol=1e-6)
    assert t.digest != data.TextureDSprites().digest


def _fake_dsprites(path, shift=(3, -2), keys=("imgs", "latents_classes"), img_hw=64, drop_centre=False):
    """A small npz laid out like dSprites: the 720 centre images (procedural masks, thresholded and
    shifted by `shift` as if the dSprites centre were off) plus some off-centre decoys."""
    m = data.procedural_masks(64).reshape(720, 64, 64) >= 0.5
    centre = np.roll(m, shift, axis=(1, 2)).astype(np.uint8)
    sh, sc, o = np.meshgrid(np.arange(3), np.arange(6), np.arange(40), indexing="ij")
    lc = np.zeros((720, 6), np.int64)
    lc[:, 1], lc[:, 2], lc[:, 3] = sh.ravel(), sc.ravel(), o.ravel()
    lc[:, 4] = lc[:, 5] = 16
    decoy = np.ones((50, 64, 64), np.uint8)
    dlc = lc[:50].copy()
    dlc[:, 4] = 3
    imgs = np.concatenate([decoy, centre[::-1]])                       # shuffled row order
    lcs = np.concatenate([dlc, lc[::-1]])
    if drop_centre:
        imgs, lcs = imgs[:-5], lcs[:-5]
    if img_hw != 64:
        imgs = imgs[:, :img_hw, :img_hw]
    arrays = {"imgs": imgs, "latents_classes": lcs}
    np.savez_compressed(path, **{k: arrays[k] for k in keys})
    return m


def test_fake_dsprites_npz_loads_and_is_recentred(tmp_path):
    p = str(tmp_path / "dsprites_fake.npz")
    want = _fake_dsprites(p)
    t = data.TextureDSprites(dsprites=p)
    np.testing.assert_array_equal(t.masks, want.astype(np.float32))  # shift undone, right row order
    img = t.render([[0, 0, 2, 5, 0]])[0]
    assert img.max() > 0 and img[0].max() == 0
    assert t.digest != data.TextureDSprites().digest


@pytest.mark.parametrize("kind,match", [("nokey", "latents_classes"), ("shape", "shape"),
                                        ("centre", "centre images"), ("notzip", "not an .npz")])
def test_wrong_dsprites_file(tmp_path, kind, match):
    p = str(tmp_path / "bad.npz")
    if kind == "nokey":
        _fake_dsprites(p, keys=("imgs",))
    elif kind == "shape":
        _fake_dsprites(p, img_hw=32)
    elif kind == "centre":
        _fake_dsprites(p, drop_centre=True)
    else:
        with open(p, "w") as f:
            f.write("hello")
    with pytest.raises(ValueError, match=match):
        t = data.TextureDSprites(dsprites=p)
        t.masks  # missing centre rows are found when masks are read
    with pytest.raises(FileNotFoundError):
        data.TextureDSprites(dsprites=str(tmp_path / "missing.npz"))


@pytest.mark.slow
def test_render_speed(ds):
    f = data.sample_factors(ds.factor_sizes, 64 * 200, 0)
    ds.render(f[:64])
    t0 = time.perf_counter()
    for k in range(200):
        ds.render(f[64 * k:64 * (k + 1)])
    rate = 64 * 200 / (time.perf_counter() - t0)
    assert rate >= 2000, f"{rate:.0f} images/s"


def test_sample_factors_range_and_determinism():
    f = data.sample_factors(data.FACTOR_SIZES, 5000, np.random.default_rng(1))
    assert f.shape == (5000, 5) and f.dtype == np.int64
    for k, s in enumerate(data.FACTOR_SIZES):
        assert set(np.unique(f[:, k])) == set(range(s))
    np.testing.assert_array_equal(f, data.sample_factors(data.FACTOR_SIZES, 5000, 1))


def test_pairs_differ_in_exactly_one_factor():
    sizes = (5, 7, 3, 6, 40)
    f1, f2, changed = data.sample_pairs(sizes, 20000, np.random.default_rng(0))
    diff = f1 != f2
    np.testing.assert_array_equal(diff.sum(1), 1)                 # k = 1, never a no-op pair
    np.testing.assert_array_equal(diff.argmax(1), changed)
    assert (f2 >= 0).all() and (f2 < np.array(sizes)).all()
    counts = np.bincount(changed, minlength=5) / 20000
    np.testing.assert_allclose(counts, 0.2, atol=0.02)           # factor chosen uniformly
    # new value uniform over the OTHER values: for shape (3 values) each of 2 alternatives ≈ ½
    rows = changed == 2
    step = (f2[rows, 2] - f1[rows, 2]) % 3
    np.testing.assert_allclose(np.bincount(step, minlength=3)[1:] / rows.sum(), 0.5, atol=0.05)
    a = data.sample_pairs(sizes, 100, 7)
    b = data.sample_pairs(sizes, 100, 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # a factor with one value is never the changed one
    _, _, ch = data.sample_pairs((1, 4, 1), 1000, 0)
    assert (ch == 1).all()
    with pytest.raises(ValueError):
        data.sample_pairs((1, 1), 10, 0)


def test_load_image_modes(tmp_path):
    # 16-bit gray PNG: scaled by the 16-bit range (v · 255 / 65535), not by its own maximum
    a16 = np.array([[0, 1000], [2000, 65535]], np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    x = data.load_image(str(tmp_path / "g16.png"))
    assert x.dtype == np.uint8 and x.shape == (2, 2, 3)
    np.testing.assert_array_equal(x[..., 0], [[0, 4], [8, 255]])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # 16-bit TIFF
    Image.fromarray(a16).save(tmp_path / "g16.tif")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "g16.tif"))[..., 1], x[..., 1])
    # 32-bit float TIFF: [0, 1], above 1 clipped
    Image.fromarray(np.array([[0.0, 0.25], [0.5, 2.0]], np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "f.tif"))[..., 0],
                                  [[0, 64], [128, 255]])
    # 16-bit-per-channel RGB PNG (PIL keeps the high byte), written by hand: PIL cannot write it
    import struct
    import zlib

    def chunk(tag, payload):
        crc = struct.pack(">I", zlib.crc32(tag + payload))
        return struct.pack(">I", len(payload)) + tag + payload + crc
    px = np.array([[[65535, 0, 1000], [4000, 30000, 65535]]], ">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in px)
    header = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)    # 2 × 1, 16 bits, colour type 2 (RGB)
    (tmp_path / "rgb48.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "rgb48.png")), px >> 8)
    # gray + alpha
    Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "la.png")), [[[100] * 3, [0] * 3]])
    # 8-bit gray
    Image.fromarray(np.array([[10, 20]], np.uint8)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "g.png")), [[[10] * 3, [20] * 3]])
    # RGBA composited over black
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "a.png")),
                                  [[[200, 100, 50], [0, 0, 0], [100, 50, 25]]])
    # palette and CMYK
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "p.png")), [[[255, 0, 0], [0, 0, 255]]])
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "c.tif"))[0, 0], [255, 0, 0])
    # unreadable → ValueError naming the file; missing → FileNotFoundError
    (tmp_path / "bad.png").write_bytes(b"not really a png")
    with pytest.raises(ValueError, match="bad.png"):
        data.load_image(str(tmp_path / "bad.png"))
    with pytest.raises(FileNotFoundError):
        data.load_image(str(tmp_path / "none.png"))


def test_one_rule_for_every_bit_depth(tmp_path):
    """The same crop saved as 8-bit and as 16-bit (v · 257) PNG and TIFF gives the same pixels within 1
    level; a dark 16-bit image stays dark (it is not stretched by its own maximum)."""
    crop = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(crop).save(tmp_path / "c8.png")
    for ext in ("png", "tif"):
        Image.fromarray(crop.astype(np.uint16) * 257).save(tmp_path / f"c16.{ext}")
        d = np.abs(data.load_image(str(tmp_path / f"c16.{ext}")).astype(int)
                   - data.load_image(str(tmp_path / "c8.png")).astype(int))
        assert d.max() <= 1, ext
    Image.fromarray(np.full((4, 4), 4000, np.uint16)).save(tmp_path / "dark16.png")
    assert data.load_image(str(tmp_path / "dark16.png")).max() == 16   # 4000 / 65535 · 255


def test_pad_to_square():
    img = np.ones((2, 5, 3), np.uint8)
    sq = data.pad_to_square(img)
    assert sq.shape == (5, 5, 3)
    np.testing.assert_array_equal(sq[:, :, 0].sum(1), [0, 5, 5, 0, 0])  # top 1, bottom 2 (odd → bottom)
    m = data.pad_to_square(np.ones((4, 1), bool))
    np.testing.assert_array_equal(m.sum(0), [0, 4, 0, 0])


def test_pad_resize_keeps_aspect_and_positions(tmp_path):
    # 20 × 40 (H × W) image, white rectangle rows 2:18, cols 8:32
    img = np.zeros((20, 40, 3), np.uint8)
    img[2:18, 8:32] = 255
    d = tmp_path / "t" / "a"
    d.mkdir(parents=True)
    Image.fromarray(img).save(d / "r.png")
    Image.fromarray(np.zeros((40, 20, 3), np.uint8)).save(d / "tall.png")
    Image.fromarray(np.full((3, 5, 3), 90, np.uint8)).save(d / "tiny.png")
    (tmp_path / "t" / "b").mkdir()
    Image.fromarray(img).save(tmp_path / "t" / "b" / "x.png")
    s = folders.ImageSet(["a/r.png", "a/tiny.png"], [0, 0], ["a"],
                      paths=[str(d / "r.png"), str(d / "tiny.png")])
    out = s.images([0], 20)[0]
    # padded to 40 × 40 (rows shifted by 10), halved: rectangle rows 6:14, cols 4:16
    assert out.shape == (20, 20, 3)
    assert out[7:13, 5:15].min() >= 250                # inside
    assert out[:5].max() == 0 and out[15:].max() == 0  # padding and background rows
    assert out[:, :3].max() == 0 and out[:, 17:].max() == 0
    rows = np.flatnonzero(out[..., 0].max(1) > 127)
    cols = np.flatnonzero(out[..., 0].max(0) > 127)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 13, 4, 15)
    # tiny 3 × 5 → padded to 5 × 5 (row 1 to 3 hold the image) and upscaled to 10
    t = s.images([1], 10)[0]
    assert t.shape == (10, 10, 3) and t[4:6].min() == 90 and t[0].max() == 0


def test_handcrafted_features_known_shapes():
    n = 4
    images = np.zeros((n, 20, 20, 3), np.uint8)
    masks = np.zeros((n, 20, 20), bool)
    masks[0, 2:8, 3:9] = True                       # filled 6 × 6 square
    images[0, 2:8, 3:9] = [200, 100, 50]
    images[0, 2:8, 3] = [100, 0, 50]                # one column darker red/green
    masks[1, 0:4, 0:4] = True                       # L: 4 × 4 minus the top-right 2 × 2
    masks[1, 0:2, 2:4] = False
    yy, xx = np.mgrid[0:20, 0:20] + 0.5
    masks[2] = np.hypot(yy - 10, xx - 10) <= 8      # disc
    masks[3, 5, 5] = True                           # single pixel
    f = data.handcrafted_features(images, masks)
    assert set(f) == {"area", "mean_r", "mean_g", "mean_b", "solidity"}
    np.testing.assert_allclose(f["area"][:2], [36, 12])
    np.testing.assert_allclose([f["mean_r"][0], f["mean_g"][0], f["mean_b"][0]],
                               [(5 * 200 + 100) / 6, (5 * 100) / 6, 50])
    np.testing.assert_allclose(f["solidity"][0], 1.0)
    np.testing.assert_allclose(f["solidity"][1], 12 / 14)   # hull adds half the missing corner
    assert 0.9 < f["solidity"][2] < 1.0
    np.testing.assert_allclose(f["solidity"][3], 1.0)
    with pytest.warns(UserWarning, match="empty"):
        g = data.handcrafted_features(images[:1], np.zeros((1, 20, 20), bool))
    assert g["area"][0] == 0 and np.isnan(g["solidity"][0]) and np.isnan(g["mean_r"][0])


def _morphology_features(images, masks):
    """Solidity, log area and a few texture/blob features inside the mask."""
    from scipy import ndimage
    hc = data.handcrafted_features(images, masks)
    g = images.astype(np.float64).mean(3)
    rows = []
    for i in range(len(images)):
        v = g[i][masks[i]]
        mu = v.mean()
        bright = (g[i] > 1.8 * mu) & masks[i]
        lab, nb = ndimage.label(bright)
        sizes = np.bincount(lab.ravel())[1:] if nb else np.zeros(1)
        rows.append([v.std() / mu, bright.sum() / masks[i].sum(), (sizes >= 3).sum(),
                     sizes.max() / masks[i].sum()])
    return np.column_stack([hc["solidity"], np.log(hc["area"]), np.array(rows)])


def test_synthetic_cells_properties():
    from sklearn.tree import DecisionTreeClassifier
    t = folders.load_target("synthetic-cells", seed=0)
    assert t.classes == ["single", "multiple", "condensed", "negative"]
    assert len(t.train) == 3200 and len(t.test) == 800
    np.testing.assert_array_equal(np.bincount(t.train.labels), [800] * 4)
    np.testing.assert_array_equal(np.bincount(t.test.labels), [200] * 4)
    assert t.train.has_masks
    x_tr, m_tr = t.train.images(np.arange(3200), 80), t.train.masks(np.arange(3200), 80)
    x_te, m_te = t.test.images(np.arange(800), 80), t.test.masks(np.arange(800), 80)
    assert x_tr.shape == (3200, 80, 80, 3) and m_tr.shape == (3200, 80, 80)
    assert t.test.images([0], 64).shape == (1, 64, 64, 3)
    # deterministic from the seed
    assert folders.load_target("synthetic-cells", seed=0).digest == t.digest
    assert folders.load_target("synthetic-cells", seed=1).digest != t.digest
    # cell size varies a lot (the "scale" analysis correlates a latent with mask area)
    area = m_tr.sum((1, 2))
    assert area.min() > 100 and area.max() / area.min() > 3 and area.std() / area.mean() > 0.3
    # colour varies: mean red inside the mask spreads
    red = data.handcrafted_features(x_tr, m_tr)["mean_r"]
    assert red.std() > 15
    # mean brightness alone is a poor classifier (best 4-interval threshold rule)
    mean_tr, mean_te = x_tr.mean((1, 2, 3))[:, None], x_te.mean((1, 2, 3))[:, None]
    stump = DecisionTreeClassifier(max_depth=2, random_state=0).fit(mean_tr, t.train.labels)
    acc_mean = stump.score(mean_te, t.test.labels)
    assert acc_mean < 0.45, acc_mean
    # ... while a few morphology features separate the classes well (chance = 0.25)
    clf = DecisionTreeClassifier(max_depth=4, random_state=0)
    clf.fit(_morphology_features(x_tr, m_tr), t.train.labels)
    acc_morph = clf.score(_morphology_features(x_te, m_te), t.test.labels)
    assert acc_morph > 0.75, acc_morph


def _textures_folder(tmp_path, n):
    folder = tmp_path / "textures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"t{i}.png")
    return folder
