"""Target datasets for drl-microscopy: the paper's four microscopy datasets as their downloads unpack, a
researcher's own image folders, and the built-in synthetic-cells set.

Where each dataset's images, classes, masks and split live is data, not code: `DATASETS` below, one entry per
paper dataset, written from the dataset pages and from the paper's official code
(Malga-Vision/disentangled_representation_microscopy, code/dataset/). `load_target` finds one of those layouts
under --data-root (its top, or any level that identifies it), checks the paper's classes, decodes every image
once, and splits: the official code's split where it defines one, the download's own train/test where it has
one. A plain `<class>/<image>` or `train|test/<class>/<image>` folder works for any other data.
"""
import collections
import functools
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from sklearn.model_selection import train_test_split

import data

# --- 1. The paper's datasets as they download --------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where a download keeps its images: paths from its top, `{class}` at the class folder level; `masks`: a
    mask-folder pattern per split part, or "dat" for contour files beside each image."""
    name: str
    train: str
    test: str = None
    masks: tuple = ()
    exts: tuple = ()          # image extensions taken (default: any PIL reads)


@dataclass(frozen=True)
class Dataset:
    source: str               # where to download it, and what the layouts come from
    classes: tuple            # the paper's classes (folder names as the official code lists them)
    split: str                # "paper": the official code's stratified 80/20, seed 42; "native": train/ test/
    layouts: tuple
    aliases: tuple = ()       # (folder name, class) where a download names a class otherwise
    extra: str = "error"      # class folders the paper does not use: "error", or "leave out" (named once)
    hint: tuple = ()          # (pattern, message): a known wrong folder, named when no layout matches
    others: tuple = ()        # (regex on a folder's path, what it is): parts of the download that are not the
                              # paper's data (a test part, another year, a derived folder); read as plain folders


DATASETS = {
    "lensless": Dataset(
        source="Pastore, Zimmerman, Biswas & Bianco, Sci. Rep. 2020: 10 plankton species, 640 images each, masks",
        classes=("ACTINOSPHAERIUM NUCLEOFILUM", "ARCELLA VULGARIS", "BLEPHARISMA AMERICANUM", "DIDINIUM NASUTUM",
                 "DILEPTUS", "EUPLOTES EURYSTOMUS", "PARAMECIUM BURSARIA", "SPIROSTOMUM AMBIGUUM",
                 "STENTOR COERULEUS", "VOLVOX"),
        split="native",
        others=((r"IMAGEBIN(/|$)", "a mask folder of the lensless download (TRAIN_IMAGEBIN or TEST_IMAGEBIN)"),),
        layouts=(Layout("the lensless download: TRAIN_IMAGE/TRAIN_IMAGE/<class>/*.jpg, masks in "
                        "TRAIN_IMAGE/TRAIN_IMAGEBIN, the same under TEST_IMAGE",
                        train="TRAIN_IMAGE/TRAIN_IMAGE/{class}", test="TEST_IMAGE/TEST_IMAGE/{class}",
                        masks=("TRAIN_IMAGE/TRAIN_IMAGEBIN/{class}", "TEST_IMAGE/TEST_IMAGEBIN/{class}")),)),
    "whoi15": Dataset(
        source="WHOI-Plankton 2007 (hdl.handle.net/1912/7341); WHOI15: its 15 classes of Ciranni et al. 2024",
        classes=("Asterionellopsis", "Chaetoceros", "Cylindrotheca", "Dactyliosolen", "Dinobryon", "Ditylum",
                 "Licmophora", "Phaeocystis", "Pleurosigma", "Pseudonitzschia", "Rhizosolenia", "Skeletonema",
                 "Thalassiosira", "detritus", "pennate"),
        split="paper", extra="leave out",
        others=((r"/20(0[89]|1[0-9])(/|$)", "another year of WHOI-Plankton (the paper uses 2007)"),
                (r"/test$", "the test part of WHOI15 (the paper's code reads 2007/train/ only)")),
        layouts=(Layout("WHOI15 as the paper's code reads it: WHOI15_2007-2010/2007/train/<class>/*.png",
                        train="2007/train/{class}"),
                 Layout("the WHOI-Plankton 2007 archive: 2007/<class>/*.png (every WHOI class)",
                        train="2007/{class}"))),
    "vacuoles": Dataset(
        source="github.com/CCCofficial/Vacuoles-dataset-unsupervised-learning; 'positive' is the paper's 'single'",
        classes=("condensed", "multiple", "negative", "positive"),
        split="native", aliases=(("single", "positive"),),
        others=((r"/train_clustershcf(/|$)", "the download's cluster folder (classes found by clustering)"),
                (r"/hand_crafted_features(/|$)", "the download's handcrafted-feature tables")),
        layouts=(Layout("the vacuoles download: Dataset/images/{train_annotated,test}/<class>",
                        train="images/train_annotated/{class}", test="images/test/{class}"),)),
    "sipakmed": Dataset(
        source="SIPaKMeD (Plissiti et al., ICIP 2018), www.cs.uoi.gr/~marina/sipakmed.html: one zip per class",
        classes=("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"),
        split="paper",
        layouts=(Layout("SIPaKMeD as downloaded: im_<Class>/CROPPED/*.bmp with .dat contours",
                        train="im_{class}/CROPPED", masks="dat", exts=(".bmp",)),
                 Layout("SIPaKMeD with each zip unpacked in its own folder: im_<Class>/im_<Class>/CROPPED/*.bmp",
                        train="im_{class}/im_{class}/CROPPED", masks="dat", exts=(".bmp",)),
                 Layout("SIPaKMeD as the paper's code reads it: <Class>/CROPPED/*.bmp",
                        train="{class}/CROPPED", masks="dat", exts=(".bmp",))),
        hint=("im_{class}", "download holds the full-slide images but no CROPPED/ folder; the paper uses the "
                            "4,049 cell crops in im_<Class>/CROPPED/")),
}
TARGETS = tuple(DATASETS) + ("synthetic-cells",)
SPLITS = {"paper": "the paper's: stratified 80/20, seed 42 (the official code's train_test_split)",
          "native": "the download's own train and test folders",
          "project": "stratified 80/20 per class, seed {seed} (saved and reused)"}

TEST_FRACTION = 0.2
BAD_IMAGE_TOLERANCE = 0.01  # undecodable images skipped up to this fraction (or count, when >= 1); else an error
MIN_IMAGE_SIZE = 16         # px, shorter side: smaller images are used but named in a warning
MASK_SLACK = 4              # px: a mask this close to its image's size is padded or cropped to it
JUNK = ("__MACOSX", "Thumbs.db", "desktop.ini")  # and every name starting with "." (AppleDouble ._*)


# --- 2. ImageSet and Target --------------------------------------------------------------------------------------

# Where an image's mask comes from: one mask image, or contour files (.dat), for an image of `size` (w, h)
Mask = collections.namedtuple("Mask", "files size")


class ImageSet:
    """Labelled images decoded on demand: `.labels` (n,) int64, `.classes`, `.names` (paths relative to the
    target folder), `.images(idx, size)` → uint8 (n, size, size, 3) padded to a centred square and resized,
    `.masks(idx, size)` → bool (n, size, size) or None, `.has_masks`, `.digest`, `.subset(idx)`. Items are
    files (`paths`, `masks`: a Mask or None each) or rows of in-memory arrays (`arrays`, `mask_arrays`)."""

    def __init__(self, names, labels, classes, paths=None, masks=None, arrays=None,
                 mask_arrays=None, rows=None, stamp="", content=None):
        self.names, self.classes = list(names), list(classes)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self._content = None if content is None else list(content)  # sha256 of each file (image + mask)
        self._paths, self._masks = paths, masks
        self._arrays, self._mask_arrays = arrays, mask_arrays
        self._rows = np.arange(len(self.names)) if rows is None else np.asarray(rows, np.int64)
        self._stamp = stamp  # identity of the in-memory arrays (their digest)

    def __len__(self):
        return len(self.names)

    @property
    def has_masks(self):
        return self._mask_arrays is not None or any(m is not None for m in (self._masks or []))

    @property
    def with_masks(self):
        """Indices of the images that have a mask (all of them for in-memory sets with masks)."""
        if self._mask_arrays is not None:
            return np.arange(len(self))
        return np.array([i for i, m in enumerate(self._masks or []) if m is not None], np.int64)

    def _index(self, idx):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"image index out of range for a set of {len(self)} images")
        return idx % max(len(self), 1)

    def images(self, idx, size):
        """uint8 (n, size, size, 3) RGB, padded to a centred square and resized."""
        items = [data.resize_image(self._read(i), size) for i in self._index(idx)]
        return np.array(items, np.uint8).reshape(-1, size, size, 3)

    def masks(self, idx, size):
        """bool (n, size, size) masks padded and resized like the images (nearest), or None."""
        if not self.has_masks:
            return None
        return np.array([data.resize_mask(self._read(i, mask=True), size) for i in self._index(idx)],
                        bool).reshape(-1, size, size)

    def _read(self, i, mask=False):
        """Image i, uint8 (H, W, 3), or its mask, bool (H, W), as stored."""
        if self._arrays is not None:
            return (self._mask_arrays if mask else self._arrays)[self._rows[i]]
        return read_mask(self._masks[i]) if mask else data.load_image(self._paths[i])

    def subset(self, idx):
        """A new ImageSet with the items `idx` (same classes)."""
        idx = self._index(idx)
        pick = (lambda xs: None if xs is None else [xs[int(i)] for i in idx])
        return ImageSet([self.names[int(i)] for i in idx], self.labels[idx], self.classes,
                        paths=pick(self._paths), masks=pick(self._masks), arrays=self._arrays,
                        mask_arrays=self._mask_arrays, rows=self._rows[idx], stamp=self._stamp,
                        content=pick(self._content))

    @functools.cached_property
    def digest(self):
        """sha256 over names (relative paths), labels, classes and each file's bytes (or the arrays'
        digest): a copied folder is the same dataset, an edited image another one."""
        h = hashlib.sha256(json.dumps([self.names, self.labels.tolist(), self.classes]).encode())
        h.update(self._stamp.encode())
        h.update(self._rows.tobytes() if self._arrays is not None else b"")
        if self._content is not None:  # file-backed sets; in-memory ones are identified by the stamp
            h.update(json.dumps(self._content).encode())
        return h.hexdigest()


class Target:
    """A target: `.name`, `.classes`, `.train`, `.test` (ImageSets), `.digest`, `.path` (None when built in),
    `.layout`, `.kind` of split (paper, native, project) and `.split_kind` in words, `.bad` (skipped
    images), `.left_out` (class folders not used), `.ignored` (other files), `.files` ({name: sha256}),
    `.empty_masks` (masks that fill no pixel)."""

    def __init__(self, name, classes, train, test, *, layout, kind, seed=0, path=None, bad=(), left_out=(),
                 ignored=0, files=None, empty_masks=()):
        self.name, self.classes, self.train, self.test = name, list(classes), train, test
        self.layout, self.kind, self.path = layout, kind, path
        self.split_kind = SPLITS[kind].format(seed=seed)
        self.bad, self.left_out, self.ignored = list(bad), list(left_out), ignored
        self.files, self.empty_masks = files or {}, list(empty_masks)

    @property
    def digest(self):
        return hashlib.sha256(f"{self.name}|{self.train.digest}|{self.test.digest}".encode()).hexdigest()

    def split_record(self):
        """The split as a file records it: its kind, and the train and test images (paths relative to the
        dataset folder) with the sha256 of each, so a reader can audit which images were tested, byte for byte."""
        return {"target": self.name, "kind": self.kind, "split": self.split_kind, "folder": self.path,
                **{part: {n: self.files[n] for n in s.names} for part, s in (("train", self.train), ("test", self.test))}}

    def class_named(self, name):
        """The class `name` is: the exact name, or an unambiguous case-insensitive prefix of one."""
        if name in self.classes:
            return name
        hits = [c for c in self.classes if c.casefold().startswith(name.casefold())]
        if len(hits) != 1:
            raise ValueError(f"--holdout-class {name!r} {'matches ' + ' and '.join(hits) if hits else 'is not'} "
                             f"a class of {self.name}; classes: {', '.join(self.classes)}")
        return hits[0]


def describe(target, short=False):
    """What --check-data prints (short: the one line every run starts with)."""
    n_masks, n = len(target.train.with_masks) + len(target.test.with_masks), len(target.train) + len(target.test)
    where = f" at {target.path}" if target.path else ""
    if short:
        return (f"target {target.name}: {target.layout}{where}; {len(target.classes)} classes, {len(target.train)} "
                f"train / {len(target.test)} test images, {n_masks} with a mask; split: {target.split_kind}")
    width = max(len(c) for c in target.classes + ["class"])
    lines = [f"{target.name}: {target.layout}{where}", f"split: {target.split_kind}", "",
             f"{'class':<{width}}  {'train':>6}  {'test':>6}"]
    lines += [f"{c:<{width}}  {np.sum(target.train.labels == k):>6}  {np.sum(target.test.labels == k):>6}"
              for k, c in enumerate(target.classes)]
    empty = f"; {len(target.empty_masks)} fill no pixel (treated as missing)" if target.empty_masks else ""
    lines += [f"{'total':<{width}}  {len(target.train):>6}  {len(target.test):>6}", "",
              f"masks: {n_masks} of {n} images have a usable one{empty}" if n_masks or empty else "masks: none"]
    skipped = [f"{len(target.bad)} undecodable image(s)"] if target.bad else []
    if target.left_out:
        skipped.append(f"{len(target.left_out)} class folder(s) the paper does not use ({', '.join(target.left_out)})")
    if target.ignored:
        skipped.append(f"{target.ignored} other file(s) in the image folders")
    lines.append("skipped: " + ("; ".join(skipped) if skipped else "nothing"))
    return "\n".join(lines)


def read_split(path):
    """The image names of a split file written from Target.split_record: {"train": [...], "test": [...]}."""
    try:
        with open(path) as f:
            saved = json.load(f)
        return {"train": list(saved["train"]), "test": list(saved["test"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"split file {path} is not a valid split ({e}); delete it to re-split") from None


# --- 3. Loading a target -----------------------------------------------------------------------------------------

class BadImages(ValueError):
    """More undecodable images than allowed; `.bad` lists every one as (name, reason)."""

    def __init__(self, message, bad):
        super().__init__(message)
        self.bad = bad


def load_target(name, root=None, seed=0, split=None, split_name="the saved split", max_bad=BAD_IMAGE_TOLERANCE):
    """Load a target by name: a DATASETS layout under `root` (default $DRL_DATA or ./data), at it, below or above
    it, or a plain folder there (<class>/<image>, or train|test/<class>/<image>; masks/ mirroring the images).

    The paper's classes are checked and ordered as the official code orders the download's own spelling; the
    split is the paper's or the download's own, else (a plain folder, or another part of a download) 80/20 per
    class with `seed`, or the saved `split` ({"train", "test"} names; `split_name` names it in errors). Every
    image is decoded here: undecodable ones are skipped up to `max_bad` (a count >= 1 or a fraction < 1) after
    the split, so the other test images stay the paper's; above it BadImages lists them all. `synthetic-cells`
    is built in.
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
    if name == "synthetic-cells":
        return _synthetic_target(seed, split, split_name)
    found = find_layout(name, root)
    items, ignored = _collect_images(found)
    train, test, kind = _split_items(found, items, seed, split, split_name)
    sizes, files, bad = _decode_all(found.top, [it.name for it in items], max_bad)
    items = [it for it in items if it.name in sizes]   # undecodable images leave after the split: it stays the paper's
    train, test = ([it for it in part if it.name in sizes] for part in (train, test))
    for c in range(len(found.classes)):
        if not any(it.label == c for it in items):
            raise ValueError(f"class '{found.classes[c]}' in {found.top} has no readable images")
    masks, empty = _find_masks(found, items, sizes, files)

    def make(part):
        return ImageSet([it.name for it in part], [it.label for it in part], found.classes,
                        paths=[it.path for it in part],
                        masks=None if masks is None else [masks.get(it.name) for it in part],
                        content=[files[it.name] + _mask_digest(files, masks, it.name, found.top) for it in part])

    target = Target(name, found.classes, make(train), make(test), layout=found.layout, kind=kind, seed=seed,
                    path=found.top, bad=bad, left_out=found.left_out, ignored=ignored, files=files, empty_masks=empty)
    empty = [c for i, c in enumerate(found.classes) if not np.any(target.test.labels == i)]
    if empty:
        warnings.warn(f"class(es) {', '.join(empty)} of {found.top} have no test images; their accuracy is not "
                      f"measured")
    return target


# --- 4. Finding a layout -----------------------------------------------------------------------------------------

@dataclass
class Found:
    """A layout found: its top folder, the class order, the folders of each class per split part."""
    layout: str
    top: str
    classes: list
    parts: dict               # {"train" | "test" | "": {class: folder}}
    masks: dict               # {part: {class: mask folder}} (empty without mask folders)
    split: str                # "paper" | "native" | "project"
    exts: tuple = ()
    left_out: tuple = ()
    contours: bool = False    # masks are .dat contours beside each image (Sipakmed)


def _key(name):
    return " ".join(name.split()).casefold()


def _entries(folder):
    """Sorted names in `folder` without the junk of unpacked archives (__MACOSX, Thumbs.db, ._*, .*)."""
    try:
        return sorted(n for n in os.listdir(folder) if not n.startswith(".") and n not in JUNK)
    except OSError:
        return []


def _subdirs(folder):
    return [d for d in _entries(folder) if os.path.isdir(os.path.join(folder, d))]


def _child(folder, *names):
    """folder/names..., each part matched in any case (CROPPED, Cropped); None when a part is not there."""
    for name in names:
        hits = [d for d in _subdirs(folder) if d.casefold() == name.casefold()] if folder else []
        folder = os.path.join(folder, name if name in hits else hits[0]) if hits else None
    return folder


def _class_folders(top, pattern):
    """{folder name at the {class} level: its image folder} for `pattern` under `top`."""
    parts = pattern.split("/")
    k = next(i for i, p in enumerate(parts) if "{class}" in p)
    base = _child(top, *parts[:k])
    pre, post = (p.casefold() for p in parts[k].split("{class}"))
    out = {}
    for d in _subdirs(base) if base else ():
        if d.casefold().startswith(pre) and d.casefold().endswith(post) and len(d) > len(pre) + len(post):
            name = d[len(pre):len(d) - len(post)]
            folder = _child(os.path.join(base, d), *[p.replace("{class}", name) for p in parts[k + 1:]])
            if folder:
                out[name] = folder
    return out


def _known(spec, folders):
    """{paper class: folder} for the folders (by name) that are one of the paper's classes or their aliases."""
    known = {_key(c): c for c in spec.classes} | {_key(a): c for a, c in spec.aliases}
    return {known[_key(d)]: f for d, f in folders.items() if _key(d) in known}


def _paper_classes(name, spec, folders, where):
    """(class order, {class: folder}, left out) from the folders found, checked against the paper's classes."""
    named = _known(spec, {d: d for d in folders})              # class -> its folder's name
    missing = [c for c in spec.classes if c not in named]
    extra = sorted(set(folders) - set(named.values()))
    if missing:
        raise ValueError(f"{where} has {len(named)} of the {len(spec.classes)} {name} classes of the paper; missing: "
                         f"{', '.join(missing)}" + (f"; found instead: {', '.join(extra)}" if extra else ""))
    if extra and spec.extra == "error":
        raise ValueError(f"{where} has class folder(s) the paper's {name} does not have: {', '.join(extra)}; "
                         f"expected exactly {', '.join(spec.classes)}")
    order = sorted(named)  # ImageFolder's order of the download's own spelling, whatever the folders on disk say
    return order, {c: folders[named[c]] for c in order}, tuple(extra)


def _match(name, spec, layout, top):
    """The Found for `layout` at `top`, or None when it has none of the paper's classes there."""
    train = _class_folders(top, layout.train)
    known, where = _known(spec, train), f"{top} ({layout.name})"
    if not known:
        return None
    if len(known) < len(spec.classes):  # classes missing here: unpacked a level off?
        for other in spec.layouts:
            elsewhere = set(_known(spec, _class_folders(top, other.train))) - set(known)
            if other != layout and elsewhere:
                show = lambda lay: lay.train.replace("{class}", "<class>")  # noqa: E731
                raise ValueError(f"{top} mixes two nestings: {', '.join(sorted(elsewhere))} as {show(other)}, the "
                                 f"other classes as {show(layout)}; unpack every class the same way")
    classes, folders, left_out = _paper_classes(name, spec, train, where)
    parts = {"train": folders}
    if layout.test:
        test = _class_folders(top, layout.test)
        if not test:
            raise ValueError(f"{where} has no test folders ({layout.test.replace('{class}', '<class>')}); the paper "
                             f"uses the download's own test split")
        _, parts["test"], _ = _paper_classes(name, spec, test, where + ", test")
    contours = layout.masks == "dat"
    masks = {} if contours else {part: _known(spec, _class_folders(top, pattern))
                                 for part, pattern in zip(parts, layout.masks)}
    return Found(layout.name, top, classes, parts, masks, "native" if layout.test else spec.split, layout.exts,
                 left_out, contours)


def _uses(found):
    return [f for parts in (found.parts, found.masks) for part in parts.values() for f in part.values() if f]


def _inside(path, folder):
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def find_layout(name, root=None):
    """The Found for target `name`: a DATASETS layout at, below (3 levels) or above (3 levels, when the folder
    pointed at is part of it) the start folder, else a plain folder there. Errors say what was looked for."""
    root = root or os.environ.get("DRL_DATA") or "./data"
    if os.path.isfile(root):
        raise ValueError(f"--data-root {root} is a file, not a folder; point it at the folder that holds the "
                         f"{name} download")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} not found; {_where_to_put(name, root)}")
    start = os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else root
    spec = DATASETS[name]
    found, level = [], [start]
    for _ in range(4):                                         # the start folder and 3 levels below it
        below = []
        for top in level:                                      # a copy found is not searched inside
            here = [f for f in (_match(name, spec, lay, top) for lay in spec.layouts) if f]
            found += here
            used = [u for f in here for u in _uses(f)]
            below += [p for p in (os.path.join(top, d) for d in _subdirs(top))
                      if not any(_inside(u, p) or _inside(p, u) for u in used)]
        level = below
    up = os.path.abspath(start)
    for _ in range(3):                                         # above: only a layout the start folder is part of
        up = os.path.dirname(up)
        for lay in spec.layouts:
            f = _match(name, spec, lay, up)
            if f and any(_inside(u, start) or _inside(start, u) for u in _uses(f)):
                found.append(f)
    unique = {(os.path.abspath(f.top), f.layout): f for f in found}
    if len(unique) > 1:
        raise ValueError(f"{start} holds {name} more than once: " + "; ".join(f"{f.layout} at {f.top}" for f in
                         unique.values()) + "; point --data-root at one of them")
    if unique:
        return next(iter(unique.values()))
    return _plain(name, spec, start)


def _plain(name, spec, start):
    """A plain folder: <class>/<image>, or train/<class>/<image> and test/<class>/<image>."""
    has_train, has_test = (os.path.isdir(os.path.join(start, p)) for p in ("train", "test"))
    if has_train != has_test:
        raise ValueError(f"{start} has a {'train' if has_train else 'test'}/ folder but no "
                         f"{'test' if has_train else 'train'}/; a native split needs both (or neither)")
    parts = {p: {c: os.path.join(start, p, c) for c in _subdirs(os.path.join(start, p)) if c != "masks"}
             for p in (("train", "test") if has_train else ("",))}
    main = "train" if has_train else ""
    if not parts[main]:
        raise ValueError(_hint(spec, start) or f"no class folders in {start}; {_where_to_put(name, start)}")
    if has_train and not parts["test"]:
        raise ValueError(f"{start}/test is empty; a native split needs test images (or remove train/ and test/ "
                         f"to split here)")
    extra = sorted(set(parts.get("test", ())) - set(parts[main]))
    if extra:
        raise ValueError(f"{start}/test has classes not in train/: {', '.join(extra)}; every test class needs "
                         f"training images")
    layout, split, left_out = "a plain folder: <class>/<image>", "project", ()
    posix = os.path.abspath(start).replace(os.sep, "/")
    other = next((what for pattern, what in spec.others if re.search(pattern, posix)), None)
    if other:  # a part of the download that is not the paper's data: never called the paper's
        warnings.warn(f"{start} looks like {other}, not the paper's {name} data; it is read as a plain folder with "
                      f"the project's split")
    if not _known(spec, parts[main]):                          # a researcher's own classes
        if hint := _hint(spec, start):
            raise ValueError(hint)
        if len(parts[main]) < 2:
            only = next(iter(parts[main].values()))
            inner = f"; if its sub-folders are the classes, point --data-root at {only}" if _subdirs(only) else ""
            raise ValueError(f"{start} has a single class folder '{os.path.basename(only)}'; need at least two "
                             f"classes{inner}")
        classes = sorted(parts[main])
    else:                                                      # the paper's classes: checked, split as it does
        classes, parts[main], left_out = _paper_classes(name, spec, parts[main], start)
        if has_train:
            parts["test"] = _known(spec, parts["test"])
        layout, split = f"a plain folder with the paper's {name} classes", spec.split
        if other:
            layout, split = f"a plain folder ({other})", "project"
        elif split == "native" and not has_train:
            split = "project"
            warnings.warn(f"{start} has the {name} classes but not the download's own test split, which the paper "
                          f"uses; they are split 80/20 here")
    if has_train:
        split, layout = "native", layout.replace("<class>/<image>", "train|test/<class>/<image>")
    masks = {p: {c: os.path.join(start, "masks", p, os.path.basename(f)) for c, f in part.items()}
             for p, part in parts.items()} if os.path.isdir(os.path.join(start, "masks")) else {}
    return Found(layout, start, classes, parts, masks, split, (), left_out)


def _hint(spec, start):
    """The message for a known wrong folder under `start` (DATASETS' `hint`), or None."""
    found = sorted(os.path.basename(f) for f in (_class_folders(start, spec.hint[0]) if spec.hint else {}).values())
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    return f"found {shown} in {start}: this {spec.hint[1]}" if found else None


def _where_to_put(name, where):
    spec = DATASETS[name]
    accepted = "; ".join(lay.name for lay in spec.layouts)
    seen = ", ".join(_entries(where)[:8]) if os.path.isdir(where) else ""
    return (f"the {name} layouts read are: {accepted}; or a plain <class>/<image> or train|test/<class>/<image> "
            f"folder (README, 'Datasets'); set --data-root or DRL_DATA" + (f"; found: {seen}" if seen else ""))


# --- 5. The images and masks of a layout -------------------------------------------------------------------------

Item = collections.namedtuple("Item", "name path label part")  # name: the path from the top, the image's id


def _collect_images(found):
    """([Item] in ImageFolder order: by part, class (found.classes order), then sorted file name), number of
    other files ignored in the image folders."""
    exts = found.exts or data.IMAGE_EXTENSIONS
    items, ignored = [], 0
    for part, folders in found.parts.items():
        for label, c in enumerate(found.classes):
            folder = folders.get(c)
            if folder is None:
                continue
            entries = [f for f in _entries(folder) if os.path.isfile(os.path.join(folder, f))]
            files = [f for f in entries if os.path.splitext(f)[1].lower() in exts]
            contours = [f for f in entries if found.contours and f.lower().endswith(".dat")]
            ignored += len(entries) - len(files) - len(contours)
            if not files and part != "test":
                raise ValueError(f"class folder {folder} has no images; add images or remove the folder")
            for f in files:
                path = os.path.join(folder, f)
                items.append(Item(os.path.relpath(path, found.top).replace(os.sep, "/"), path, label, part))
    if found.parts.get("test") is not None and not any(it.part == "test" for it in items):
        raise ValueError(f"the test folders of {found.top} hold no images; a native split needs test images")
    return items, ignored


def _decode_all(top, names, max_bad):
    """Decode every image (as load_image does) and hash its bytes. Returns ({name: (width, height)},
    {name: sha256}, [(name, reason)] of the undecodable ones); over `max_bad` raises BadImages."""
    sizes, files, bad, small = {}, {}, [], []
    for n in names:
        try:
            with open(os.path.join(top, n), "rb") as f:
                raw = f.read()
            h, w = data.decode_image(io.BytesIO(raw)).shape[:2]   # the bytes read once, decoded and hashed
            files[n] = hashlib.sha256(raw).hexdigest()
        except data.IMAGE_ERRORS as e:
            bad.append((n, data.error_reason(e)))
            continue
        sizes[n] = (w, h)
        if min(w, h) < MIN_IMAGE_SIZE:
            small.append(f"{n} ({w}x{h})")
    if small:
        warnings.warn(f"{len(small)} image(s) in {top} are smaller than {MIN_IMAGE_SIZE} px on a side and will "
                      f"be upscaled a lot: {', '.join(small[:10])}" + (", ..." if len(small) > 10 else ""))
    allowed = max_bad if max_bad >= 1 else max_bad * len(names)
    if len(bad) > allowed:
        raise BadImages(f"{len(bad)} of {len(names)} images in {top} cannot be decoded, more than "
                        f"--max-bad-images {max_bad:g} allows; fix or remove them (each is listed above)", bad)
    return sizes, files, bad


def _mask_digest(files, masks, n, top):
    if not masks or n not in masks:
        return ""
    return "".join(files[os.path.relpath(f, top)] for f in masks[n].files)


def _mask_candidates(found, item, index):
    """The files that could be `item`'s mask: contour .dat files beside it (<stem>_cyt*.dat, <stem>_nuc*.dat),
    or the image with its stem in its mask folder. `index` keeps each folder's listing, {stem: [paths]}."""
    dat = found.contours
    folder = os.path.dirname(item.path) if dat else found.masks.get(item.part, {}).get(found.classes[item.label])
    if not folder or not os.path.isdir(folder):
        return []
    if folder not in index:
        index[folder] = {}
        for f in _entries(folder):
            m = re.match(r"(.*)_(?:cyt|nuc)", f) if f.lower().endswith(".dat") else None
            if dat and m:
                index[folder].setdefault(m.group(1), []).append(os.path.join(folder, f))
            elif not dat and os.path.splitext(f)[1].lower() in data.IMAGE_EXTENSIONS:
                index[folder].setdefault(os.path.splitext(f)[0], [os.path.join(folder, f)])
    return index[folder].get(os.path.splitext(os.path.basename(item.path))[0], [])


def _find_masks(found, items, sizes, files):
    """({image name: Mask} of the images with a usable mask, None without mask folders; [names whose mask fills
    no pixel at data.HANDCRAFTED_SIZE]). Masks only serve the handcrafted features: a missing, unreadable,
    mis-sized or empty one drops its image from them (one warning), never from classification. A mask within
    MASK_SLACK px of its image's size is padded or cropped to it. Mask bytes go into `files`."""
    if not found.masks and not found.contours:
        return None, []
    out, skipped, empty, fitted, index = {}, [], [], 0, {}
    for it in items:
        paths = _mask_candidates(found, it, index)
        if not paths:
            continue
        m = Mask(tuple(paths), sizes[it.name])
        try:
            a = read_mask(m, fit=False)
        except ValueError as e:
            skipped.append(f"{paths[0]} ({e})")
            continue
        (h, w), size = a.shape, m.size
        if (w, h) != size:
            if max(abs(w - size[0]), abs(h - size[1])) > MASK_SLACK:
                skipped.append(f"{paths[0]} is {w}x{h} but its image is {size[0]}x{size[1]}")
                continue
            fitted += 1
        if not data.resize_mask(_fit(a, size), data.HANDCRAFTED_SIZE).any():
            empty.append(it.name)
            continue
        for p in paths:
            with open(p, "rb") as f:
                files[os.path.relpath(p, found.top)] = hashlib.sha256(f.read()).hexdigest()
        out[it.name] = m
    if fitted:
        warnings.warn(f"{fitted} mask(s) in {found.top} are up to {MASK_SLACK} px off their image's size; padded "
                      f"or cropped to it (at the bottom and right)")
    if len(out) < len(items):
        warnings.warn(f"{len(out)} of {len(items)} images in {found.top} have a usable mask; the handcrafted-feature "
                      f"analysis uses those" + (f" ({len(empty)} fill no pixel, e.g. {empty[0]})" if empty else "")
                      + (f" (skipped: {'; '.join(skipped[:3])})" if skipped else ""))
    return out, empty


def read_mask(mask, fit=True):
    """A Mask → bool (H, W). Contours (.dat: one 'x,y' or 'x y' point per line, Sipakmed's) are filled, the
    cytoplasm and nucleus together. A mask image: foreground is any non-zero value (any channel), read
    without the intensity scaling of `load_image` so 16-bit label masks keep small labels; a JPEG, whose
    compression rings around edges, is thresholded at half range instead. `fit`: pad or crop to the image's
    size at the bottom and right."""
    w, h = mask.size
    if mask.files[0].lower().endswith(".dat"):
        canvas = Image.new("L", (w, h), 0)
        for path in mask.files:
            pts = _contour(path)
            if len(pts) >= 3:
                ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255, outline=255)
        return np.asarray(canvas) > 0
    path = mask.files[0]
    try:
        with Image.open(path) as img:
            img.seek(0)
            jpeg = img.format == "JPEG"
            img = ImageOps.exif_transpose(img)
            img.load()
            if jpeg:
                a = np.asarray(img.convert("L")) >= 128
            elif img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16"):
                a = np.asarray(img)
                a = (a[..., 0] if a.ndim == 3 else a) > 0
            else:
                a = np.asarray(img.convert("RGB")).max(axis=2) > 0
    except data.IMAGE_ERRORS as e:
        raise ValueError(f"cannot read mask {path} ({data.error_reason(e)}); remove or replace it") from None
    return _fit(a, mask.size) if fit else a


def _fit(a, size):
    """A mask padded or cropped to the image's (w, h) at the bottom and right."""
    (w, h), a = size, a[:size[1], :size[0]]
    return np.pad(a, ((0, h - a.shape[0]), (0, w - a.shape[1])))


def _contour(path):
    try:
        with open(path) as f:
            pts = [[float(v) for v in re.split(r"[,\s]+", line.strip())[:2]] for line in f if line.strip()]
        return np.array(pts, np.float64).reshape(-1, 2)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read contour {path} ({e})") from None


# --- 6. Splits ---------------------------------------------------------------------------------------------------

def _split_items(found, items, seed, split, split_name):
    """(train items, test items, split kind) of every image as listed, before any is decoded."""
    if found.split == "native":
        return [it for it in items if it.part == "train"], [it for it in items if it.part == "test"], "native"
    kind = found.split
    labels = np.array([it.label for it in items])
    for c in np.flatnonzero(np.bincount(labels, minlength=len(found.classes)) < 2) if kind != "project" else ():
        folder = os.path.dirname(next(it.path for it in items if it.label == c))
        raise ValueError(f"class '{found.classes[c]}' in {folder} has 1 image; the stratified 80/20 split needs at "
                         f"least 2 per class: add images or remove the class folder")
    if kind == "paper" and -(-len(items) * TEST_FRACTION // 1) < len(found.classes):
        raise ValueError(f"{len(items)} images in {found.top} are too few for the 80/20 split of "
                         f"{len(found.classes)} classes: its test part needs an image of each class")
    tr, te = _split([it.name for it in items], labels, kind, seed, split, split_name, found.top)
    return [items[k] for k in tr], [items[k] for k in te], kind


def _split(names, labels, kind, seed, saved, saved_name, where):
    """(train, test) sorted index arrays. "paper": scikit-learn's train_test_split(test_size=0.2,
    random_state=42, stratify=labels) over the images in ImageFolder order, exactly the official code's call;
    "project": stratified 80/20 per class with `seed`, or the `saved` split when it matches the images."""
    idx = np.arange(len(names))
    if kind == "paper":
        tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=42, stratify=labels)
        return np.sort(tr), np.sort(te)
    if saved is None:
        return data.stratified_split(labels, seed)
    current, listed = set(names), set(saved["train"]) | set(saved["test"])
    if listed != current or set(saved["train"]) & set(saved["test"]):
        new, gone = sorted(current - listed), sorted(listed - current)
        example = (new or gone or sorted(set(saved["train"]) & set(saved["test"])))[0]
        raise ValueError(f"split file {saved_name} does not match the images in {where} ({len(new)} new, "
                         f"{len(gone)} missing, e.g. {example}); delete it to re-split")
    pos = {n: k for k, n in enumerate(names)}
    return (np.array([pos[n] for n in saved["train"]], np.int64),
            np.array([pos[n] for n in saved["test"]], np.int64))


# --- 7. synthetic-cells: built in, offline (data.make_synthetic_cells draws the images) --------------------------

def _synthetic_target(seed, saved, saved_name):
    images, masks, labels = data.make_synthetic_cells(data.SYNTHETIC_N, 80, seed)
    names = [f"{data.SYNTHETIC_CLASSES[l]}/cell_{i:04d}" for i, l in enumerate(labels)]
    stamp = hashlib.sha256(b"synthetic-cells-v2" + images.tobytes() + masks.tobytes()).hexdigest()
    train, test = _split(names, labels, "project", seed, saved, saved_name, "synthetic-cells")
    files = {n: hashlib.sha256(images[k].tobytes()).hexdigest() for k, n in enumerate(names)}

    def make(idx):
        return ImageSet([names[k] for k in idx], labels[idx], data.SYNTHETIC_CLASSES, arrays=images,
                        mask_arrays=masks, rows=idx, stamp=stamp)

    return Target("synthetic-cells", data.SYNTHETIC_CLASSES, make(train), make(test),
                  layout="built in (procedural, 4 morphology classes)", kind="project", seed=seed, files=files)
