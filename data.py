"""Data for drl-microscopy: the Texture-dSprites source, the weak-supervision pair sampler and the
microscopy targets (Dapueto et al. 2025, Sec. III; the official Malga-Vision/disentangled_representation_microscopy).

Imports only numpy, PIL, scipy and the standard library, so the file can be copied into other projects.
Images everywhere are numpy uint8 arrays (n, H, W, 3) RGB.

Top to bottom: 1. Texture-dSprites, 2. the k = 1 pair sampler, 3. image reading, 4. synthetic-cells, the
built-in target (folders.py reads the real ones), 5. handcrafted features from masks.
"""
import colorsys
import functools
import hashlib
import os
import warnings
import zipfile

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage
from scipy.spatial import ConvexHull

# --- 1. Texture-dSprites -----------------------------------------------------------------------------------------

FACTOR_NAMES = ("texture", "colour", "shape", "scale", "orientation")
FACTOR_SIZES = (5, 7, 3, 6, 40)
DATA_VERSION = "texture-dsprites-v1"  # bump whenever rendering changes (part of `.digest`)

# dSprites' latent values (Matthey et al. 2017): 6 scales linspace(0.5, 1, 6) and 40 orientations
# linspace(0, 2π, 40).  NOTE: dSprites includes BOTH endpoints, so orientation 0 and 39 (0 and 2π) draw
# the same image; we keep the dSprites values as they are (the factor grid stays the paper's).
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)

# dSprites' latents_classes columns: color, shape, scale, orientation, posX, posY (32 positions each,
# values linspace(0, 1, 32)).  The grid has no exact centre (0.5): index 15 = 0.484, 16 = 0.516.
# We take index 16 and then shift all masks by the one integer offset that puts the
# mean centroid of the point-symmetric shapes (square, ellipse) nearest the image centre.
DSPRITES_CENTRE = 16

_SQUARE_SIDE = 0.30   # square side at scale 1, as a fraction of the image (≈ 19 px at 64, like dSprites)
_SUPERSAMPLE = 4      # anti-aliasing: 4×4 samples per pixel


# White, then six hues of equal CIELAB lightness L* = 70 (chroma 40, hues 5° + 60°k, D65), in sRGB. The official
# code uses seaborn's husl_palette(6, l=.7), the same idea; all six are inside the gamut, so L* is exact (tested).
COLOURS = np.array([(1.0, 1.0, 1.0), (0.94174796, 0.55805296, 0.6521549), (0.8612951, 0.6207745, 0.41520536),
                    (0.58843106, 0.71062756, 0.4319871), (0.18530756, 0.74665827, 0.6908398),
                    (0.21604156, 0.7177184, 0.9258569), (0.71783686, 0.6250306, 0.90450615)], np.float32)


def procedural_textures(size=64):
    """(5, size, size) float32 in [0.35, 1]: grain, stripes, checker, blobs, dots.

    Five easy-to-tell grayscale textures; the minimum 0.35 keeps the shape visible everywhere.
    Deterministic (fixed seed); the texture is fixed in image coordinates (not rotated with the shape)."""
    rng = np.random.default_rng(20250)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    period = size / 8.0
    grain = ndimage.gaussian_filter(rng.random((size, size)), 0.6, mode="wrap")
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * yy / period)
    checker = ((np.floor(xx / (period / 2)) + np.floor(yy / (period / 2))) % 2).astype(np.float64)
    blobs = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 16, mode="wrap")
    dx = (xx % period) - period / 2
    dy = (yy % period) - period / 2
    dots = np.clip(period * 0.3 - np.hypot(dx, dy) + 0.5, 0, 1)  # anti-aliased discs, radius 0.3·period
    out = []
    for t in (grain, stripes, checker, blobs, dots):
        t = (t - t.min()) / max(t.max() - t.min(), 1e-12)
        out.append(0.35 + 0.65 * t)
    return np.stack(out).astype(np.float32)


IMAGE_EXTENSIONS = frozenset(e.lower() for e in Image.registered_extensions())  # every format PIL reads


def load_textures(folder, size=64):
    """(5, size, size) float32 in [0, 1] from five grayscale images in `folder` (paper: Brodatz D11,
    D40, D23, D109, D102). Any PIL format; converted to gray, centre-cropped to a square, resized
    (antialiased bilinear). More than five: the first five in sorted order are used, with a warning."""
    if os.path.isfile(folder):
        raise ValueError(f"--textures {folder} is a file, not a folder; give the folder that holds the 5 "
                         f"grayscale texture images")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"textures folder {folder} not found; give a folder with 5 grayscale "
                                f"images (--textures DIR) or leave it out for procedural textures")
    files = sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
                   and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    if len(files) < 5:
        raise ValueError(f"textures folder {folder} has {len(files)} images, need 5 grayscale images "
                         f"(--textures DIR)")
    if len(files) > 5:
        warnings.warn(f"textures folder {folder} has {len(files)} images; using the first five in "
                      f"sorted order: {', '.join(files[:5])}")
    out = []
    for f in files[:5]:
        gray = np.asarray(Image.fromarray(load_image(os.path.join(folder, f))).convert("L"))
        s = min(gray.shape)
        top, left = (gray.shape[0] - s) // 2, (gray.shape[1] - s) // 2
        gray = Image.fromarray(gray[top:top + s, left:left + s]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(gray, dtype=np.float32) / 255.0)
    return np.stack(out)


def _shape_inside(shape, xs, ys, half):
    """Inside test in the shape's own frame (y up, pixel units); `half` = half the square side."""
    if shape == 0:  # square
        return (np.abs(xs) <= half) & (np.abs(ys) <= half)
    if shape == 1:  # ellipse, axes 1.2 × 0.6 of the square side (2:1, like dSprites' ellipse)
        return (xs / (1.2 * half)) ** 2 + (ys / (0.6 * half)) ** 2 <= 1.0
    # heart: (x² + y² − 1)³ − x² y³ ≤ 0, spans x ∈ [−1.139, 1.139], y ∈ [−1, 1.236];
    # scaled to the square's width and centred on its bounding box.
    k = 1.139 / half
    hx, hy = xs * k, ys * k + 0.118
    return (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0


@functools.lru_cache(maxsize=4)  # a pure function of `size` (1 s), its read-only result reused by every instance
def procedural_masks(size=64):
    """(3, 6, 40, size, size) float32 anti-aliased masks (4×4 supersampling), centred.

    Orientation θ rotates the shape counter-clockwise on screen about the image centre."""
    ss = _SUPERSAMPLE
    n = size * ss
    c = (np.arange(n) + 0.5) / ss - size / 2          # sub-pixel centres, pixel units, centre at 0
    x, y_up = c[None, :], -c[:, None]                  # image rows go down; shape frame has y up
    cos, sin = np.cos(ORIENTATIONS)[:, None, None], np.sin(ORIENTATIONS)[:, None, None]
    xs = cos * x + sin * y_up                          # rotate the sampling grid by −θ
    ys = -sin * x + cos * y_up
    out = np.empty((3, 6, 40, size, size), np.float32)
    for s in range(3):
        for j, scale in enumerate(SCALES):
            inside = _shape_inside(s, xs, ys, 0.5 * _SQUARE_SIDE * size * scale)
            out[s, j] = inside.reshape(40, size, ss, size, ss).mean(axis=(2, 4))
    out.setflags(write=False)
    return out


DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"


def _check_dsprites(path):
    """Validate a dSprites npz from its zip directory and array headers (the 3 GB of images stay unread);
    returns its identity, the CRC-32 and size of both arrays (content-based and free to read)."""
    need = f"; give the real {DSPRITES_FILE} (--dsprites PATH) or leave it out for procedural shapes"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dSprites file {path} not found{need}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"dSprites file {path} is not an .npz archive{need}")
    with zipfile.ZipFile(path) as zf:
        info = {i.filename[:-4]: i for i in zf.infolist() if i.filename in ("imgs.npy", "latents_classes.npy")}
        for key in ("imgs", "latents_classes"):
            if key not in info:
                raise ValueError(f"dSprites file {path} has no '{key}' array{need}")
        shapes = {}
        for key, i in info.items():
            with zf.open(i) as f:
                shapes[key] = _npy_header(f)[:2]
    (imgs, fortran), (latents, _) = shapes["imgs"], shapes["latents_classes"]
    if imgs[1:] != (64, 64) or len(imgs) != 3 or fortran or latents != (imgs[0], 6):
        raise ValueError(f"dSprites file {path} has arrays of shape {imgs} and {latents}, expected (737280, 64, 64) "
                         f"and (737280, 6){need}")
    return ";".join(f"{i.filename}:{i.CRC:08x}:{i.file_size}" for i in info.values())  # in the archive's order


def _npy_header(f):
    """(shape, fortran_order, dtype) from the header of a .npy stream, left at the start of its data."""
    major, _ = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)


def dsprites_masks(path, size=64):
    """(3, 6, 40, size, size) float32 masks from the real dSprites npz, at the centre position.

    Reads `latents_classes`, finds the 720 rows with colour 0 and posX = posY = 16, then streams only those
    rows out of `imgs` (the 3 GB array is never held in memory). Masks are binary (dSprites has no
    anti-aliasing); see DSPRITES_CENTRE for the centring."""
    _check_dsprites(path)
    with np.load(path, allow_pickle=False) as z:
        lc = np.asarray(z["latents_classes"], dtype=np.int64)
    rows = {}  # (shape, scale, orientation) -> its row in imgs; the first occurrence wins
    for r in np.flatnonzero((lc[:, 0] == 0) & (lc[:, 4] == DSPRITES_CENTRE) & (lc[:, 5] == DSPRITES_CENTRE))[::-1]:
        rows[tuple(lc[r, 1:4])] = int(r)
    missing = [k for k in np.ndindex(3, 6, 40) if k not in rows]
    if missing:
        raise ValueError(f"dSprites file {path} lacks {len(missing)} of the 720 centre images (colour 0, posX = "
                         f"posY = {DSPRITES_CENTRE}); give the real {DSPRITES_FILE} (--dsprites PATH)")
    masks = np.empty((720, 64, 64), np.float32)
    with zipfile.ZipFile(path) as zf, zf.open("imgs.npy") as f:
        dtype, start = _npy_header(f)[2], f.tell()
        for r, k in sorted((rows[key], k) for k, key in enumerate(np.ndindex(3, 6, 40))):  # forward seeks only
            f.seek(start + r * 64 * 64 * dtype.itemsize)
            masks[k] = np.frombuffer(f.read(64 * 64 * dtype.itemsize), dtype=dtype).reshape(64, 64) > 0
    # Centre: shift all masks by one integer offset (square + ellipse centroids → image centre).
    sym, (yy, xx) = masks[:480], np.mgrid[0:64, 0:64] + 0.5
    if sym.sum() == 0:
        raise ValueError(f"dSprites file {path}: the centre images are empty; give the real {DSPRITES_FILE}")
    cy, cx = (sym * yy).sum() / sym.sum(), (sym * xx).sum() / sym.sum()
    masks = ndimage.shift(masks, (0, round(32 - cy), round(32 - cx)), order=0, cval=0.0)  # zeros come in
    if size != 64:
        masks = np.clip([np.asarray(Image.fromarray(m, mode="F").resize((size, size), Image.BILINEAR))
                         for m in masks], 0, 1)
    return masks.reshape(3, 6, 40, size, size).astype(np.float32)


class TextureDSprites:
    """Texture-dSprites (Dapueto et al. 2025): texture 5 × colour 7 × shape 3 × scale 6 × orientation 40 =
    25,200 centred 64×64 RGB images on black; image = mask × colour × texture.

    textures: folder of five grayscale images (default: five procedural textures).
    dsprites: path of the real dsprites_ndarray_*.npz (default: procedural shapes drawn like dSprites').
    Shape masks are computed once, on first use; `render` is then array indexing and multiplication.
    """

    def __init__(self, textures=None, dsprites=None, size=64):
        self.size, self.dsprites_path = int(size), dsprites
        self.factor_names, self.factor_sizes = FACTOR_NAMES, FACTOR_SIZES
        self.textures = (procedural_textures(self.size) if textures is None
                         else load_textures(textures, self.size))          # (5, S, S) in [0, 1]
        self.colours = COLOURS                                              # (7, 3) in [0, 1]
        # fail early on a wrong dSprites file; its masks are read lazily (first render)
        self._dsprites_id = None if dsprites is None else _check_dsprites(dsprites)
        # colour × texture × 255 for the 35 (texture, colour) pairs: (35, S, S, 3)
        self._coltex = (self.textures[:, None, :, :, None] * self.colours[None, :, None, None, :]
                        * 255.0).reshape(35, self.size, self.size, 3).astype(np.float32)

    def __len__(self):
        return int(np.prod(FACTOR_SIZES))

    @functools.cached_property
    def masks(self):
        """(720, S, S) float32 shape masks, row = shape·240 + scale·40 + orientation."""
        m = procedural_masks(self.size) if self.dsprites_path is None else dsprites_masks(self.dsprites_path, self.size)
        return np.ascontiguousarray(m.reshape(720, self.size, self.size))

    @functools.cached_property
    def digest(self):
        """sha256 over the version string, size, textures, colours and masks (used in cache keys).
        With a dSprites file, its arrays' CRC-32s stand for the masks (no need to read 3 GB)."""
        h = hashlib.sha256(f"{DATA_VERSION}|{self.size}|{self._dsprites_id}".encode())
        shapes = self.masks if self._dsprites_id is None else np.zeros(0, np.float32)
        for a in (self.textures, self.colours, shapes):
            h.update(np.ascontiguousarray(a, np.float32).tobytes())
        return h.hexdigest()

    def index_to_factors(self, idx):
        """Mixed-radix decode, factors in FACTOR_NAMES order: (n,) → (n, 5) int64."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"Texture-dSprites index out of range [0, {len(self)})")
        return np.stack(np.unravel_index(idx, FACTOR_SIZES), 1)

    def factors_to_index(self, factors):
        """Mixed-radix encode: (n, 5) → (n,) int64."""
        return np.ravel_multi_index(self._check_factors(factors).T, FACTOR_SIZES)

    def _check_factors(self, factors):
        f = np.asarray(factors, dtype=np.int64)
        f = f.reshape(1, -1) if f.ndim == 1 else f
        if f.ndim != 2 or f.shape[1] != 5:
            raise ValueError(f"factors must have shape (n, 5), got {np.shape(factors)}")
        if f.size and ((f < 0).any() or (f >= np.asarray(FACTOR_SIZES)).any()):
            raise ValueError(f"factor values out of range; sizes are {FACTOR_SIZES} ({FACTOR_NAMES})")
        return f

    def render(self, factors):
        """(n, 5) int factors → uint8 (n, S, S, 3): mask × colour × texture, rounded."""
        f = self._check_factors(factors)
        m = self.masks[f[:, 2] * 240 + f[:, 3] * 40 + f[:, 4]]        # (n, S, S)
        ct = self._coltex[f[:, 0] * 7 + f[:, 1]]                        # (n, S, S, 3), × 255
        ct *= m[..., None]
        ct += 0.5
        return ct.astype(np.uint8)

    def images(self, idx):
        """uint8 (n, S, S, 3) images of the given flat indices, rendered 1,024 at a time (6x faster than at once)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return np.concatenate([self.render(self.index_to_factors(idx[i:i + 1024]))
                               for i in range(0, max(len(idx), 1), 1024)])


def explicitness_split(n_images, n=None, seed=0):
    """A fixed train/test split of n of the n_images Texture-dSprites images (all when n is None) for the
    explicitness benchmark (paper Table IV): n drawn without replacement by a seeded generator, then 20 % of
    each orientation value to test (orientation has the most values: 40). Returns sorted (train, test)."""
    n = n_images if n is None else int(n)
    if not 2 <= n <= n_images:
        raise ValueError(f"the explicitness subset needs 2 to {n_images} images, got {n}")
    chosen = np.sort(np.random.default_rng(seed).choice(n_images, n, replace=False))
    orientation = chosen % FACTOR_SIZES[-1]  # the last mixed-radix digit of the index
    train, test = stratified_split(orientation, seed)
    return chosen[train], chosen[test]


def stratified_split(labels, seed, test_fraction=0.2):
    """Per class (in label order): shuffle with one seeded generator, `test_fraction` (rounded, ≥ 1 when the
    class has ≥ 2 images) to test. Returns sorted index arrays (train, test)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = 0 if len(idx) < 2 else max(1, int(round(test_fraction * len(idx))))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train, np.int64)), np.sort(np.array(test, np.int64))


# --- 2. Weak supervision (Locatello et al. 2020, k = 1) ----------------------------------------------------------

def sample_factors(factor_sizes, n, rng):
    """(n, K) int64 factor values, each uniform over its range. `rng`: Generator or seed."""
    rng = np.random.default_rng(rng)
    sizes = np.asarray(factor_sizes, dtype=np.int64)
    return rng.integers(0, sizes, size=(int(n), len(sizes)), dtype=np.int64)


def sample_pairs(factor_sizes, n, rng):
    """k = 1 pairs: v1 uniform; one factor chosen uniformly (among factors with ≥ 2 values); v2 = v1 with
    that factor set to a uniformly drawn *different* value. Returns (f1, f2, changed (n,) int64).

    (The official code may redraw the same value, giving no-op pairs; the design asks for a different one.)
    """
    rng = np.random.default_rng(rng)
    sizes = np.asarray(factor_sizes, dtype=np.int64)
    f1 = sample_factors(sizes, n, rng)
    variable = np.flatnonzero(sizes >= 2)
    if variable.size == 0:
        raise ValueError(f"cannot make pairs: every factor has a single value (sizes {tuple(sizes)})")
    changed = variable[rng.integers(0, variable.size, size=int(n))]
    rows = np.arange(int(n))
    shift = rng.integers(1, sizes[changed])            # 1 .. size−1: uniform over the other values
    f2 = f1.copy()
    f2[rows, changed] = (f1[rows, changed] + shift) % sizes[changed]
    return f1, f2, changed.astype(np.int64)


# --- 3. Reading images: any PIL mode → uint8 RGB, pad to a centred square, resize --------------------------------

def load_image(path):
    """Read any image PIL can open as uint8 (H, W, 3) RGB.

    - 16-bit / 32-bit integer and float images (I;16, I, F) are scaled by the range of their type
      (`_full_scale`: 16-bit v · 255 / 65535, float [0, 1]; negatives → 0), never by their own maximum,
      so the same crop as 8 and as 16 bits gives the same pixels (±1) and intensities stay comparable.
    - Alpha (RGBA, LA, PA, P with transparency) is composited over black, the padding colour.
    - Everything else (L, 1, P, CMYK, YCbCr, ...) goes through PIL's convert("RGB"). PIL itself decodes
      16-bit-per-channel colour PNGs (48/64-bit) to 8 bits by keeping the high byte (≈ v / 256).
    - Multi-frame files (TIFF stacks): the first frame. EXIF orientation is applied.
    Raises FileNotFoundError (missing) or ValueError naming the file (unreadable)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} not found")
    try:
        return decode_image(path)
    except IMAGE_ERRORS as e:
        raise ValueError(f"cannot read image {path} ({error_reason(e)}); remove or replace it") from None


IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(source):
    """The first frame of a path or file object, EXIF-oriented, as uint8 RGB; PIL's exceptions pass through."""
    with Image.open(source) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        img.load()
        return _to_rgb(img)


def error_reason(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _to_rgb(img):
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.nan_to_num(a[..., 0] if a.ndim == 3 else a), 0, None)
        g = np.round(np.minimum(a * (255.0 / _full_scale(mode, a)), 255)).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _full_scale(mode, a):
    """The bit-depth rule: an image's value range is that of its type, the same for every image of a
    dataset, so brightness stays comparable. 16-bit → 65535; a 32-bit integer image ('I', as PIL reads
    some 16-bit files) → 65535 when its values fit 16 bits, else 2³¹ − 1; a float image ('F') → 1."""
    if mode == "F":
        return 1.0
    if mode.startswith("I;16") or (a.max(initial=0) <= 65535):
        return 65535.0
    return 2.0 ** 31 - 1


def pad_to_square(img):
    """Zero-pad an (H, W) or (H, W, C) array to a centred square of side max(H, W) (aspect kept).
    An odd leftover pixel goes to the bottom / right."""
    img = np.asarray(img)
    h, w = img.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    out = np.zeros((s, s) + img.shape[2:], img.dtype)
    out[top:top + h, left:left + w] = img
    return out


def resize_image(img, size):
    """Pad to a square, then resize to size×size (bilinear; PIL antialiases when shrinking)."""
    sq = pad_to_square(img)
    if sq.shape[0] == size:
        return sq
    return np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR))


def resize_mask(mask, size):
    """Pad to a square, then resize with nearest neighbour: bool (size, size)."""
    sq = pad_to_square(mask.astype(np.uint8) * 255)
    if sq.shape[0] != size:
        sq = np.asarray(Image.fromarray(sq).resize((size, size), Image.NEAREST))
    return sq > 127


# --- 4. synthetic-cells: a built-in, offline stand-in for the yeast-vacuole morphotypes (folders.py loads it) ----

SYNTHETIC_CLASSES = ("single", "multiple", "condensed", "negative")
# 4,000 images (3,200 train / 800 test): with 1,000 (800 train), 20 finetuning epochs are only 260 steps and
# finetuning the pixel VAE lowered the downstream accuracy (README, "Where we differ": synthetic-cells).
SYNTHETIC_N = 4000


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _smooth_noise(rng, size, sigma):
    """Zero-mean, unit-std smooth noise (gaussian-filtered white noise)."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="reflect")
    return (n - n.mean()) / max(n.std(), 1e-8)


def _disc(xx, yy, cx, cy, r):
    """Anti-aliased disc (≈ 1 px soft edge)."""
    return np.clip(r - np.hypot(xx - cx, yy - cy) + 0.5, 0.0, 1.0)


def _ring(xx, yy, cx, cy, r, width):
    """Anti-aliased ring of radius r and given width (a vacuole membrane)."""
    d = np.abs(np.hypot(xx - cx, yy - cy) - r)
    return np.clip(width / 2 - d + 0.5, 0.0, 1.0)


def _synthetic_cell(rng, label, size):
    """One cell: (image float (S, S, 3) in [0, 1], mask bool (S, S)).

    Morphology by class (like the yeast-vacuole morphotypes):
      single    - one large vacuole: dark lumen, thick bright membrane (a donut);
      multiple  - 2 to 4 medium vacuoles (dark lumens, bright rims);
      condensed - one compact bright blob in dimmed cytoplasm;
      negative  - dead cell: shrunken, irregular outline, no vacuole, diffuse mottled staining.
    Class-independent nuisances: cell size (mask area), elongation, orientation, hue and saturation with
    a depth-like hue gradient, cytoplasm texture, pixel noise, and the mean intensity inside the cell
    (drawn from one distribution for every class, so brightness alone does not tell the class)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx, cy, radius, a, b, body = _cell_outline(rng, label, size, xx, yy)
    mask = body >= 0.5
    inten = _cell_interior(rng, label, size, xx, yy, cx, cy, 0.8 * min(a, b)) * body
    # Mean intensity inside the cell: the same distribution for every class.
    inten *= rng.uniform(0.3, 0.5) / max(inten[mask].mean(), 1e-6)
    inten += rng.uniform(0.005, 0.03) * rng.standard_normal((size, size))  # pixel noise everywhere
    inten = np.clip(inten, 0, 1)
    # colour: hue/saturation jitter and a depth-like hue gradient across the cell
    hue, sat = rng.uniform(-0.12, 0.12), rng.uniform(0.3, 0.8)        # a red stain (magenta to orange)
    c1, c2 = _hsv(hue, sat, 1.0), _hsv(hue + rng.uniform(0.05, 0.2), sat, 1.0)
    g_ang = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(g_ang) * (xx - cx) + np.sin(g_ang) * (yy - cy)) / (2.5 * radius), 0, 1)
    colour = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return np.clip(inten[..., None] * colour * rng.uniform(0.85, 1.15), 0, 1), mask


def _cell_outline(rng, label, size, xx, yy):
    """A wobbly ellipse of random size, elongation and orientation; negative cells shrunken, irregular.
    Returns (centre x, y, radius, semi-axes a, b, body: anti-aliased inside in [0, 1])."""
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    radius = rng.uniform(0.17, 0.40) * size                        # cell size: the "scale" of a cell
    irregular = 0.025
    if label == 3:                                                 # negative: shrunken, irregular
        radius *= rng.uniform(0.75, 0.95)
        irregular = rng.uniform(0.07, 0.12)
    elong = rng.uniform(1.0, 1.35)
    a, b = radius * np.sqrt(elong), radius / np.sqrt(elong)
    phi = rng.uniform(0, 2 * np.pi)                                # random orientation
    u = np.cos(phi) * (xx - cx) + np.sin(phi) * (yy - cy)
    v = -np.sin(phi) * (xx - cx) + np.cos(phi) * (yy - cy)
    rho, theta = np.hypot(u / a, v / b), np.arctan2(v / b, u / a)
    boundary = np.ones_like(theta)
    for k in range(2, 6):                                          # wobbly outline
        boundary += irregular * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return cx, cy, radius, a, b, np.clip((boundary - rho) * min(a, b) + 0.5, 0.0, 1.0)  # ≈ 1 px edge


def _cell_interior(rng, label, size, xx, yy, cx, cy, r_in):
    """Intensity of a textured cytoplasm with the vacuoles of the class (r_in: room inside the outline)."""
    tex = _smooth_noise(rng, size, rng.uniform(1.0, 3.0))
    inten = rng.uniform(0.25, 0.4) * (1 + rng.uniform(0.1, 0.25) * tex)
    if label == 0:                                                 # one large vacuole: a bright-rimmed donut
        off, ang = rng.uniform(0, 0.1) * r_in, rng.uniform(0, 2 * np.pi)
        vx, vy = cx + off * np.cos(ang), cy + off * np.sin(ang)
        rv = rng.uniform(0.6, 0.8) * r_in
        lumen = _disc(xx, yy, vx, vy, rv)
        inten = inten * (1 - lumen) + lumen * rng.uniform(0.03, 0.1)
        inten = np.maximum(inten, _ring(xx, yy, vx, vy, rv, rng.uniform(2.5, 4.0)))
    elif label == 1:                                               # 2 to 4 medium vacuoles
        for _ in range(rng.integers(2, 5)):
            rv = rng.uniform(0.28, 0.4) * r_in
            d, ang = (r_in - rv) * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)  # uniform in area
            vx, vy = cx + d * np.cos(ang), cy + d * np.sin(ang)
            lumen = _disc(xx, yy, vx, vy, rv)
            inten = inten * (1 - lumen) + lumen * 0.06
            inten = np.maximum(inten, _ring(xx, yy, vx, vy, rv, rng.uniform(1.5, 2.5)))
    elif label == 2:                                               # condensed: one compact bright blob
        rv = rng.uniform(0.25, 0.35) * r_in
        d, ang = rng.uniform(0, 0.3 * r_in), rng.uniform(0, 2 * np.pi)
        vx, vy = cx + d * np.cos(ang), cy + d * np.sin(ang)
        inten = np.maximum(0.6 * inten, _disc(xx, yy, vx, vy, rv))
    else:                                                          # negative: diffuse, mottled
        inten = inten * (1 + 0.35 * _smooth_noise(rng, size, rng.uniform(3.0, 6.0)))
    return np.clip(inten, 0, None)


@functools.lru_cache(maxsize=4)  # a pure function of its arguments (4 s), read-only arrays
def make_synthetic_cells(n=SYNTHETIC_N, size=80, seed=0):
    """The synthetic-cells images: (images uint8 (n, S, S, 3), masks bool (n, S, S), labels (n,)).

    Balanced over SYNTHETIC_CLASSES (class order shuffled), deterministic from `seed`. Read-only arrays."""
    rng = np.random.default_rng([int(seed), 0xCE115])
    labels = rng.permutation(np.arange(n) % len(SYNTHETIC_CLASSES)).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    for i, lab in enumerate(labels):
        img, m = _synthetic_cell(rng, int(lab), size)
        images[i] = np.round(img * 255)
        masks[i] = m
    for a in (images, masks, labels):
        a.setflags(write=False)
    return images, masks, labels


# --- 5. Handcrafted features from masks (paper Fig. 6; the official extract_simple_features.py) ------------------

HANDCRAFTED_SIZE = 224  # px: images and masks are read at this size for the handcrafted features


def handcrafted_features(images, masks):
    """dict(area, mean_r, mean_g, mean_b, solidity), each (n,) float64.

    area      = number of mask pixels;
    mean_r/g/b = mean of each channel (0-255) over the mask pixels;
    solidity  = area / convex-hull area, the hull taken over the pixel CORNERS of the mask (each pixel
                is a unit square), so a filled rectangle has solidity exactly 1. Only the leftmost and
                rightmost pixel of each row can be hull vertices, so the hull uses their corners
                (exact, and fast). (The official code uses OpenCV's largest external contour, whose hull
                runs through pixel centres; values differ slightly for small masks.)
    Empty masks: area 0 and NaN for the others, with a warning."""
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    if images.ndim != 4 or masks.shape != images.shape[:3]:
        raise ValueError(f"handcrafted_features needs images (n, H, W, 3) and masks (n, H, W); got "
                         f"{images.shape} and {masks.shape}")
    n = len(images)
    out = {k: np.full(n, np.nan) for k in ("area", "mean_r", "mean_g", "mean_b", "solidity")}
    empty = 0
    for i in range(n):
        m = masks[i]
        area = int(m.sum())
        out["area"][i] = area
        if area == 0:
            empty += 1
            continue
        pix = images[i][m].astype(np.float64)
        out["mean_r"][i], out["mean_g"][i], out["mean_b"][i] = pix.mean(axis=0)
        rows = np.flatnonzero(m.any(axis=1))
        left = m[rows].argmax(axis=1)
        right = m.shape[1] - 1 - m[rows][:, ::-1].argmax(axis=1)
        pts = np.concatenate([np.stack([rows, left], 1), np.stack([rows + 1, left], 1),
                              np.stack([rows, right + 1], 1), np.stack([rows + 1, right + 1], 1)])
        out["solidity"][i] = area / ConvexHull(pts.astype(np.float64)).volume  # 2-D volume = area
    if empty:
        warnings.warn(f"{empty} of {n} masks are empty; their colour and solidity features are NaN")
    return out
