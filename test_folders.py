"""Tests of the target datasets on disk (folders.py): layouts, classes, masks, splits, bad input."""
import hashlib
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

import data
import drl
import evaluate
import folders
import train
from test_data import _textures_folder
from conftest import TINY, assert_one_line_error, run_script


def _make_folder(root, target, classes, n_per, native=False, masks=False, size=(12, 8), ext="png"):
    """Write tiny images: class c, image k has all pixels = 10 * c + k (distinct, known)."""
    tdir = root / target
    parts = ["train", "test"] if native else [""]
    for part in parts:
        for ci, c in enumerate(classes):
            d = tdir / part / c
            d.mkdir(parents=True)
            n = n_per if part != "test" else max(1, n_per // 4)
            for k in range(n):
                a = np.full((size[1], size[0], 3), 10 * ci + k, np.uint8)
                Image.fromarray(a).save(d / f"img{k:03d}.{ext}")
                if masks:
                    md = tdir / "masks" / part / c
                    md.mkdir(parents=True, exist_ok=True)
                    mm = np.zeros((size[1], size[0]), np.uint8)
                    mm[: size[1] // 2] = 255
                    Image.fromarray(mm).save(md / f"img{k:03d}.tif")  # another extension is fine
    return tdir


def test_folder_without_native_split(tmp_path):
    _make_folder(tmp_path, "whoi15", ["b_cls", "a_cls", "c_cls"], 10)
    (tmp_path / "whoi15" / "a_cls" / "readme.txt").write_text("ignored")
    t = folders.load_target("whoi15", root=str(tmp_path), seed=0)
    assert t.name == "whoi15" and t.classes == ["a_cls", "b_cls", "c_cls"] and "seed 0" in t.split_kind
    assert len(t.train) == 24 and len(t.test) == 6
    np.testing.assert_array_equal(np.bincount(t.test.labels), [2, 2, 2])     # stratified 80/20
    assert not set(t.train.names) & set(t.test.names)
    assert all(n.split("/")[0] == t.classes[l] for n, l in zip(t.test.names, t.test.labels))
    x = t.test.images(np.arange(len(t.test)), 16)
    assert x.shape == (6, 16, 16, 3) and x.dtype == np.uint8
    k = int(t.test.names[0][-7:-4])
    given = ["b_cls", "a_cls", "c_cls"]                                      # pixel = 10·(given order) + k
    assert x[0, 8, 8, 0] == 10 * given.index(t.classes[t.test.labels[0]]) + k  # the right file
    assert t.test.masks([0], 16) is None and not t.test.has_masks
    # same seed → same split; another seed → another split
    t2 = folders.load_target("whoi15", root=str(tmp_path), seed=0)
    assert t2.test.names == t.test.names and t2.digest == t.digest
    t3 = folders.load_target("whoi15", root=str(tmp_path), seed=5)
    assert t3.test.names != t.test.names
    sub = t.train.subset([3, 1])
    assert sub.names == [t.train.names[3], t.train.names[1]]
    np.testing.assert_array_equal(sub.images([0, 1], 8), t.train.images([3, 1], 8))


def test_env_var_root(tmp_path, monkeypatch):
    _make_folder(tmp_path, "sipakmed", ["x", "y"], 5)
    monkeypatch.setenv("DRL_DATA", str(tmp_path))
    assert len(folders.load_target("sipakmed").train) == 8


def test_folder_with_native_split_and_masks(tmp_path):
    _make_folder(tmp_path, "vacuoles", ["live", "dead"], 8, native=True, masks=True)
    t = folders.load_target("vacuoles", root=str(tmp_path))
    assert t.split_kind == folders.SPLITS["native"] and t.classes == ["dead", "live"] and t.kind == "native"
    assert len(t.train) == 16 and len(t.test) == 4
    assert all(n.startswith("train/") for n in t.train.names)
    assert all(n.startswith("test/") for n in t.test.names)
    assert t.train.has_masks
    m = t.train.masks([0, 1], 12)
    # 12 × 8 image padded to 12 × 12 (2 rows each side): mask = top half of the image = rows 2:6
    assert m.dtype == bool and m.shape == (2, 12, 12)
    np.testing.assert_array_equal(np.flatnonzero(m[0].any(1)), [2, 3, 4, 5])
    assert m[0, 2:6].all()
    # a 16-bit label mask with small labels (1 of 65535) keeps its foreground
    lab = np.zeros((8, 12), np.uint16)
    lab[:, :3] = 1
    lab[:, 9:] = 40000
    name = t.test.names[0]
    os.remove(tmp_path / "vacuoles" / "masks" / (os.path.splitext(name)[0] + ".tif"))
    Image.fromarray(lab).save(tmp_path / "vacuoles" / "masks" / (os.path.splitext(name)[0] + ".png"))
    t = folders.load_target("vacuoles", root=str(tmp_path))
    m = t.test.masks([0], 12)[0]
    np.testing.assert_array_equal(m[2:10].any(0), [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert not m[:2].any() and not m[10:].any()


def test_saved_split_reused(tmp_path):
    _make_folder(tmp_path, "lensless", ["a", "b"], 10)
    cfg = train.Config(target="lensless", data_root=str(tmp_path), out=str(tmp_path / "run"))
    _, t1, sf = train.load_target(cfg)                                  # saves the split it made
    assert sf == str(tmp_path / "run" / "splits" / "lensless-project.json")
    saved = folders.read_split(sf)
    assert saved["test"] == t1.test.names and saved["train"] == t1.train.names
    t2 = folders.load_target("lensless", root=str(tmp_path), seed=123, split=saved)
    assert t2.test.names == t1.test.names                              # the saved split wins
    assert folders.load_target("lensless", root=str(tmp_path), seed=123).test.names != t1.test.names
    assert train.load_target(cfg)[1].test.names == t1.test.names
    # files changed since the split was saved → clear error naming the file
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "lensless" / "a" / "new.png")
    with pytest.raises(ValueError, match=r"lensless-project.json does not match.*1 new.*delete it"):
        train.load_target(cfg)
    _write(sf, "{not json")
    with pytest.raises(ValueError, match="not a valid split"):
        train.load_target(cfg)


def test_synthetic_split_saved_and_reused(tmp_path):
    t1 = folders.load_target("synthetic-cells")
    assert folders.read_split(_write(tmp_path / "s.json", json.dumps(t1.split_record())))["test"] == t1.test.names
    t2 = folders.load_target("synthetic-cells", split=folders.read_split(tmp_path / "s.json"))
    assert t2.test.names == t1.test.names


def _write(path, text):
    drl.write_text(path, text)
    return path


def test_partial_and_bad_masks_only_narrow_the_handcrafted_analysis(tmp_path):
    tdir = _make_folder(tmp_path, "vacuoles", ["a", "b"], 8, masks=True, size=(16, 16))
    for k in range(4):                                        # half of class b without masks
        os.remove(tdir / "masks" / "b" / f"img{k:03d}.tif")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tdir / "masks" / "a" / "img000.png")  # wrong size ...
    os.remove(tdir / "masks" / "a" / "img000.tif")
    (tdir / "masks" / "a" / "img001.tif").write_bytes(b"garbage")                         # ... unreadable
    with pytest.warns(UserWarning, match=r"10 of 16 images .* have a usable mask.*5x5 but its image is 16x16"):
        t = folders.load_target("vacuoles", root=str(tmp_path))
    assert len(t.train) + len(t.test) == 16                   # classification keeps every image
    sets = (t.train, t.test)
    assert sum(len(s.with_masks) for s in sets) == 10
    s = max(sets, key=lambda s: len(s.with_masks))
    m = s.masks(s.with_masks, 16)
    assert m.shape == (len(s.with_masks), 16, 16) and m[:, :8].all() and not m[:, 8:].any()


def test_small_images_textures_file_and_empty_test_class_say_so(tmp_path):
    _make_folder(tmp_path, "whoi15", ["a", "b"], 6, size=(3, 3))
    with pytest.warns(UserWarning, match=r"12 image\(s\) .* smaller than 16 px .*a/img000.png \(3x3\)"):
        folders.load_target("whoi15", root=str(tmp_path))
    tdir = _make_folder(tmp_path, "sipakmed", ["a", "b", "c"], 6, size=(16, 16))
    for f in (tdir / "c").iterdir():
        if f.name != "img000.png":
            f.unlink()                                        # class c: one image, so none to test
    with pytest.warns(UserWarning, match=r"class\(es\) c of .* no test images"):
        folders.load_target("sipakmed", root=str(tmp_path))
    (tmp_path / "tex.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        data.load_textures(str(tmp_path / "tex.png"))


def test_bad_input_messages(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'plankton'.*lensless, whoi15, vacuoles, sipakmed"):
        folders.load_target("plankton", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data root .* not found.*README"):
        folders.load_target("lensless", root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no class folders in .*the lensless layouts read are: .*TRAIN_IMAGE.*README"):
        folders.load_target("lensless", root=str(tmp_path))
    (tmp_path / "lensless").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        folders.load_target("lensless", root=str(tmp_path))
    _make_folder(tmp_path, "whoi15", ["only"], 3)
    with pytest.raises(ValueError, match="single class folder 'only'; need at least two classes$"):
        folders.load_target("whoi15", root=str(tmp_path))
    _make_folder(tmp_path / "one-down", "sipakmed", ["mydata/a", "mydata/b"], 2)   # the classes a level deeper
    with pytest.raises(ValueError, match=r"single class folder 'mydata'.*point --data-root at .*sipakmed/mydata$"):
        folders.load_target("sipakmed", root=str(tmp_path / "one-down"))
    (tmp_path / "whoi15" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no images"):
        folders.load_target("whoi15", root=str(tmp_path))
    _make_folder(tmp_path, "vacuoles", ["a", "b"], 2)
    (tmp_path / "vacuoles" / "train").mkdir()
    with pytest.raises(ValueError, match="train/ folder but no test/"):
        folders.load_target("vacuoles", root=str(tmp_path))


def _img(path, value, size=(20, 16), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(a).convert(mode).save(path, fmt)


def _junk(folder):
    """What unpacked archives bring along: macOS resource forks and Windows thumbnails."""
    (folder / "__MACOSX" / "x").mkdir(parents=True)
    (folder / "__MACOSX" / "x" / "._a.png").write_bytes(b"\0\5\26\7")
    (folder / "Thumbs.db").write_bytes(b"thumbs")
    (folder / "._Thumbs.db").write_bytes(b"\0\5\26\7")


def _sipakmed(top, nested=False, crops=True, slides=2):
    """im_<Class>/ with `slides` full slides NNN.bmp (+ NNN_cytKK.dat), and CROPPED/NNN_KK.bmp with NNN_KK_cyt.dat and
    NNN_KK_nuc.dat: 3 crops per slide. The cytoplasm contour is the rectangle x 2..12, y 3..9 of a 20 x 16 crop."""
    for ci, c in enumerate(folders.DATASETS["sipakmed"].classes):
        d = top / f"im_{c}" / (f"im_{c}" if nested else "")
        for slide in range(1, slides + 1):
            _img(d / f"{slide:03d}.bmp", 200, size=(64, 48))
            (d / f"{slide:03d}_cyt01.dat").write_text("1,1\n30,1\n30,30\n")
            for k in range(1, 4) if crops else ():
                _img(d / "CROPPED" / f"{slide:03d}_{k:02d}.bmp", 10 * ci + k)
                (d / "CROPPED" / f"{slide:03d}_{k:02d}_cyt.dat").write_text("2.0,3.0\n12.0,3.0\n12.0,9.0\n2.0,9.0\n")
                (d / "CROPPED" / f"{slide:03d}_{k:02d}_nuc.dat").write_text("5,5\n7,5\n7,7\n")
        _junk(d)


def test_sipakmed_download_reads_the_crops_with_their_contours_and_the_papers_split(tmp_path):
    from sklearn.model_selection import train_test_split
    top = tmp_path / "SIPaKMeD"
    _sipakmed(top)
    _junk(top)
    for root in (top, tmp_path, top / "im_Parabasal"):             # its top, above it, or one class inside it
        t = folders.load_target("sipakmed", root=str(root))
        assert t.classes == list(folders.DATASETS["sipakmed"].classes) and t.path == str(top)
        assert len(t.train) + len(t.test) == 30 and all("/CROPPED/" in n for n in t.train.names + t.test.names)
    assert t.split_kind == folders.SPLITS["paper"] and t.kind == "paper" and "im_<Class>/CROPPED" in t.layout
    names = sorted(t.train.names + t.test.names)                   # ImageFolder's order: class, then file name
    labels = [t.classes.index(n.split("/")[0][3:]) for n in names]
    _, test = train_test_split(names, test_size=0.2, random_state=42, stratify=labels)
    assert sorted(t.test.names) == sorted(test)                    # the official code's own call
    m = t.train.masks([0], 20)[0]                                  # 20 x 16 padded to 20 x 20: rows + 2
    assert m.sum() == 11 * 7 and m[5:12, 2:13].all()               # the filled cytoplasm polygon, edges included
    assert t.ignored == 0                                          # .dat contours are masks, junk is not counted
    nested = tmp_path / "nested"
    _sipakmed(nested, nested=True)
    assert len(folders.load_target("sipakmed", root=str(nested)).train) == 24


def test_sipakmed_full_slides_without_crops_or_a_class_short_are_clear_errors(tmp_path):
    _sipakmed(tmp_path / "s", crops=False)
    with pytest.raises(ValueError, match=r"im_Dyskeratotic.*full-slide images but no CROPPED/.*4,049 cell crops"):
        folders.load_target("sipakmed", root=str(tmp_path / "s"))
    _sipakmed(tmp_path / "t")
    import shutil
    shutil.rmtree(tmp_path / "t" / "im_Metaplastic")
    with pytest.raises(ValueError, match=r"has 4 of the 5 sipakmed classes of the paper; missing: Metaplastic"):
        folders.load_target("sipakmed", root=str(tmp_path / "t"))


WHOI15 = folders.DATASETS["whoi15"].classes


def test_whoi15_year_archive_takes_the_papers_15_classes_and_names_the_others(tmp_path):
    year = tmp_path / "2007"
    for c in WHOI15 + ("Guinardia", "ciliate_mix"):
        for k in range(5):
            _img(year / c / f"IFCB1_2007_{k:03d}.png", k, mode="L")
        (year / c / "Thumbs.db").write_bytes(b"thumbs")
    _junk(year)
    for root in (tmp_path, year):
        t = folders.load_target("whoi15", root=str(root))
        assert t.classes == sorted(WHOI15) and t.left_out == ["Guinardia", "ciliate_mix"]
        assert len(t.train) == 60 and len(t.test) == 15 and t.split_kind == folders.SPLITS["paper"]
    assert "2007 archive" in t.layout and "left out" not in t.layout
    assert "2 class folder(s) the paper does not use (Guinardia, ciliate_mix)" in folders.describe(t)
    os.rename(year / "Ditylum", year / "ditylum_x")
    with pytest.raises(ValueError, match=r"14 of the 15 whoi15 classes.*missing: Ditylum.*ditylum_x"):
        folders.load_target("whoi15", root=str(tmp_path))


def test_whoi15_as_the_papers_code_reads_it_from_any_level(tmp_path):
    top = tmp_path / "WHOI15_2007-2010"
    for year in ("2007", "2008"):
        for c in WHOI15:
            for k in range(5):
                _img(top / year / "train" / c / f"{year}_{k}.png", k, mode="L")
        (top / year / "test").mkdir()                              # empty, as the paper's code never reads it
    for root in (tmp_path, top, top / "2007", top / "2007" / "train"):
        t = folders.load_target("whoi15", root=str(root))
        assert t.path == str(top) and all(n.startswith("2007/train/") for n in t.train.names + t.test.names)
        assert len(t.test) == 15 and t.split_kind == folders.SPLITS["paper"]
    with pytest.warns(UserWarning, match="another year of WHOI-Plankton"):   # another year: not the paper's
        t = folders.load_target("whoi15", root=str(top / "2008" / "train"))
    assert all(n.split("/")[0] in WHOI15 for n in t.train.names) and t.kind == "project"
    plain = tmp_path / "plain" / "whoi15"
    (plain / "train" / "a").mkdir(parents=True)
    (plain / "test").mkdir()
    _img(plain / "train" / "a" / "x.png", 1)
    _img(plain / "train" / "b" / "x.png", 1)
    with pytest.raises(ValueError, match="test is empty"):
        folders.load_target("whoi15", root=str(tmp_path / "plain"))


def _vacuoles(top):
    for part, n in (("train_annotated", 4), ("test", 2), ("train_clustershcf", 3)):
        for ci, c in enumerate(folders.DATASETS["vacuoles"].classes):
            for k in range(n):
                _img(top / "Dataset" / "images" / part / c / f"{c}_{k}.png", 30 * ci + k)
                (top / "Dataset" / "hand_crafted_features" / part / c).mkdir(parents=True, exist_ok=True)
                (top / "Dataset" / "hand_crafted_features" / part / c / f"{c}_{k}.csv").write_text("area,1\n")


def test_vacuoles_download_keeps_its_native_test_split_from_any_level(tmp_path):
    _vacuoles(tmp_path)
    _junk(tmp_path / "Dataset")
    images = tmp_path / "Dataset" / "images"
    for root in (tmp_path, tmp_path / "Dataset", images, images / "train_annotated", images / "test" / "negative"):
        t = folders.load_target("vacuoles", root=str(root))
        assert t.classes == ["condensed", "multiple", "negative", "positive"] and t.split_kind == folders.SPLITS["native"]
        assert len(t.train) == 16 and len(t.test) == 8 and t.path == str(tmp_path / "Dataset")
        assert all(n.startswith("images/train_annotated/") for n in t.train.names)
        assert all(n.startswith("images/test/") for n in t.test.names)
    assert t.class_named("pos") == "positive" and t.class_named("Negative") == "negative"
    with pytest.raises(ValueError, match="--holdout-class 'x' is not a class of vacuoles"):
        t.class_named("x")
    (images / "test" / "multiple").rename(images / "test" / "multiple_x")
    with pytest.raises(ValueError, match=r"test.*missing: multiple"):
        folders.load_target("vacuoles", root=str(tmp_path))


def _ellipse(size, off=0):
    w, h = size
    yy, xx = np.mgrid[0:h + off, 0:w + off]
    return ((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2 <= 1


def _lensless(top, per_class=3, size=(40, 30)):
    classes = list(folders.DATASETS["lensless"].classes)
    classes[classes.index("PARAMECIUM BURSARIA")] = "PARAMECIUM  BURSARIA"   # the download's own spelling
    for part, n in (("TRAIN_IMAGE", per_class), ("TEST_IMAGE", 1)):
        for ci, c in enumerate(classes):
            for k in range(n):
                _img(top / part / part / c / f"{k}.jpg", 20 * ci + k, size=size, fmt="JPEG")
                mask = _ellipse(size, off=1 if (part, ci, k) == ("TRAIN_IMAGE", 0, 0) else 0)  # one a pixel off
                path = top / part / (part + "BIN") / c / f"{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(path, "JPEG", quality=75)


def test_lensless_download_with_its_jpeg_masks(tmp_path):
    _lensless(tmp_path / "lensless")
    with pytest.warns(UserWarning, match="1 mask.* up to 4 px off their image's size; padded or cropped"):
        t = folders.load_target("lensless", root=str(tmp_path))
    assert "PARAMECIUM BURSARIA" in t.classes and len(t.classes) == 10
    assert len(t.train) == 30 and len(t.test) == 10 and t.split_kind == folders.SPLITS["native"]
    assert len(t.train.with_masks) == 30 and len(t.test.with_masks) == 10
    truth = _ellipse((40, 30)).sum()
    areas = [folders.read_mask(t.train._masks[i]).sum() for i in range(30)]
    assert all(abs(a - truth) <= 0.03 * truth for a in areas), (truth, areas)   # not the JPEG ringing
    assert t.class_named("arcella") == "ARCELLA VULGARIS"
    with pytest.raises(ValueError, match="'DI' matches DIDINIUM NASUTUM and DILEPTUS"):
        t.class_named("DI")
    deeper = folders.load_target("lensless", root=str(tmp_path / "lensless" / "TRAIN_IMAGE" / "TRAIN_IMAGE"))
    assert len(deeper.test) == 10 and deeper.train.has_masks                 # pointed deeper: nothing lost
    import shutil
    shutil.rmtree(tmp_path / "lensless" / "TEST_IMAGE")
    with pytest.raises(ValueError, match="no test folders .*TEST_IMAGE/TEST_IMAGE/<class>"):
        folders.load_target("lensless", root=str(tmp_path))


@pytest.mark.parametrize("name, build, expect", [
    ("sipakmed", _sipakmed, ["SIPaKMeD as downloaded", "Dyskeratotic", "total", "24", "6", "30 of 30 images"]),
    ("vacuoles", lambda top: _vacuoles(top), ["vacuoles download", "positive", "16", "8", "masks: none"]),
    ("lensless", lambda top: _lensless(top, 1), ["lensless download", "VOLVOX", "20 of 20 images"])])
def test_check_data_prints_what_was_found_and_writes_nothing(tmp_path, capsys, name, build, expect):
    build(tmp_path / "dl")
    out = tmp_path / "run"
    for script, argv in ((train.main, []), (evaluate.main, [])):
        code, stdout, err = run_script(script, argv + ["--check-data", "--target", name, "--data-root",
                                                       str(tmp_path / "dl"), "--out", str(out)], capsys)
        assert code == 0, err
        assert all(e in stdout for e in expect), stdout
        assert "split: " in stdout and "skipped: " in stdout
    assert not out.exists()


def _truncate(path, keep=200):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:keep])   # a valid header, pixel data cut off


def test_undecodable_images_are_all_listed_and_skipped_within_the_tolerance(tmp_path):
    # header fine but data truncated (PNG and JPEG), and garbage: every image is decoded up front
    tdir = _make_folder(tmp_path, "sipakmed", ["a", "b"], 60, size=(16, 16))
    _truncate(tdir / "a" / "trunc.png")
    _truncate(tdir / "b" / "trunc.jpg", keep=300)
    (tdir / "b" / "garbage.tif").write_bytes(b"garbage")
    with pytest.raises(folders.BadImages, match="3 of 123 images.*cannot be decoded.*--max-bad-images 0.01") as e:
        folders.load_target("sipakmed", root=str(tmp_path))
    assert sorted(n for n, _ in e.value.bad) == ["a/trunc.png", "b/garbage.tif", "b/trunc.jpg"]
    assert all(reason for _, reason in e.value.bad)
    for max_bad in (3, 0.03):   # a count or a fraction
        t = folders.load_target("sipakmed", root=str(tmp_path), max_bad=max_bad)
        assert len(t.train) + len(t.test) == 120 and len(t.bad) == 3
        assert not {"a/trunc.png", "b/trunc.jpg"} & set(t.train.names + t.test.names)


def test_bad_images_listed_on_stderr_and_in_the_run_folder_before_training(tmp_path, offline_hub, capsys):
    tdir = _make_folder(tmp_path, "vacuoles", ["a", "b"], 6, size=(16, 16))
    _truncate(tdir / "a" / "trunc.png")
    _truncate(tdir / "b" / "trunc.jpg", keep=300)
    out = tmp_path / "run"
    argv = ["--stage", "finetune", "--target", "vacuoles", "--data-root", str(tmp_path), "--out", str(out),
            "--epochs", "1"] + TINY
    code, _, err = run_script(train.main, argv, capsys)
    assert code == 2 and "error: 2 of 14 images" in err and "bad-images-vacuoles.txt" in err.splitlines()[-1]
    assert "bad image: a/trunc.png:" in err and "bad image: b/trunc.jpg:" in err
    assert (out / "bad-images-vacuoles.txt").read_text().count("\n") == 2
    assert not (out / "source").exists()                      # stopped before any training
    with pytest.warns(UserWarning, match="skipped 2 undecodable image"):
        code, _, err = run_script(train.main, argv + ["--max-bad-images", "2"], capsys)
    assert code == 0, err


def test_copied_folder_is_the_same_dataset_and_a_changed_one_is_refused_in_one_line(tmp_path, offline_hub, capsys):
    import shutil
    _make_folder(tmp_path / "a", "vacuoles", ["x", "y"], 6, size=(16, 16))
    out = tmp_path / "run"
    argv = ["--stage", "finetune", "--target", "vacuoles", "--out", str(out), "--epochs", "1"] + TINY
    assert run_script(train.main, argv + ["--data-root", str(tmp_path / "a")], capsys)[0] == 0
    time.sleep(0.01)
    shutil.copytree(tmp_path / "a", tmp_path / "b")          # new modification times, same bytes
    code, stdout, err = run_script(train.main, argv + ["--data-root", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert "finetuned already" in stdout
    Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(tmp_path / "b/vacuoles/x/img000.png")
    Image.fromarray(np.full((16, 16, 3), 77, np.uint8)).save(tmp_path / "b/vacuoles/y/new.png")
    (out / "splits" / "vacuoles-project.json").unlink()      # the split would refuse first
    code, _, err = run_script(train.main, argv + ["--data-root", str(tmp_path / "b")], capsys)
    assert_one_line_error(code, err, "other settings: the target images", "sha256 is in out/splits/",
                          "use another --out, or delete")
    # the source stage names the flag that differs
    code, _, err = run_script(train.main, ["--stage", "source", "--out", str(out), "--textures",
                                           str(_textures_folder(tmp_path, 5))] + TINY, capsys)
    assert_one_line_error(code, err, "Texture-dSprites (--textures, --dsprites) is")


# ----- the paper's datasets, with the small variations real downloads have ------------------------------------

def _whoi_archive(year, spelling=lambda c: c, n=5):
    for ci, c in enumerate(WHOI15):
        for k in range(n):
            _img(year / spelling(c) / f"IFCB_{ci:02d}_{k}.png", 10 * ci + k, mode="L")


def test_the_papers_split_does_not_depend_on_the_spelling_of_the_class_folders(tmp_path):
    _whoi_archive(tmp_path / "a" / "2007")
    _whoi_archive(tmp_path / "b" / "2007", lambda c: c.upper() if c in ("detritus", "Ditylum") else c.lower())
    a, b = (folders.load_target("whoi15", root=str(tmp_path / d)) for d in "ab")
    assert a.classes == b.classes == sorted(WHOI15)        # the official code's order of the download's spelling
    assert [n.split("/", 2)[2] for n in a.test.names] == [n.split("/", 2)[2] for n in b.test.names]
    assert list(a.test.labels) == list(b.test.labels) and a.split_kind == b.split_kind == folders.SPLITS["paper"]


def test_masks_that_fill_no_pixel_are_counted_apart_and_treated_as_missing(tmp_path):
    _sipakmed(tmp_path)
    crops = sorted((tmp_path / "im_Parabasal" / "CROPPED").glob("*_cyt.dat"))
    crops[0].write_text("2,3\n12,3\n")                                     # two points: no area
    crops[1].write_text("200,300\n210,300\n210,310\n")                      # outside the 20 x 16 crop
    for nuc in (str(c).replace("_cyt", "_nuc") for c in crops[:2]):
        os.remove(nuc)
    with pytest.warns(UserWarning, match="28 of 30 images .* have a usable mask.*2 fill no pixel"):
        t = folders.load_target("sipakmed", root=str(tmp_path))
    assert len(t.train.with_masks) + len(t.test.with_masks) == 28 and len(t.empty_masks) == 2
    assert "masks: 28 of 30 images have a usable one; 2 fill no pixel (treated as missing)" in folders.describe(t)


def test_a_part_of_a_download_that_is_not_the_papers_data_gets_the_projects_split(tmp_path):
    top = tmp_path / "WHOI15_2007-2010"
    for part in ("2007/train", "2007/test", "2009/train"):
        _whoi_archive(top / part)
    _whoi_archive(tmp_path / "archive" / "2009")
    _vacuoles(tmp_path / "vac")
    for root, looks_like in ((top / "2007" / "test", "the test part of WHOI15"),
                             (top / "2009" / "train", "another year of WHOI-Plankton"),
                             (tmp_path / "archive" / "2009", "another year of WHOI-Plankton")):
        with pytest.warns(UserWarning, match=f"looks like {looks_like}.*project's split"):
            t = folders.load_target("whoi15", root=str(root))
        assert t.kind == "project" and "paper" not in t.split_kind and "paper's whoi15 classes" not in t.layout
    with pytest.warns(UserWarning, match="looks like the download's cluster folder"):
        t = folders.load_target("vacuoles", root=str(tmp_path / "vac" / "Dataset" / "images" / "train_clustershcf"))
    assert t.kind == "project"


def test_two_copies_of_a_dataset_at_any_depth_are_one_error_naming_both(tmp_path):
    _whoi_archive(tmp_path / "2007")                                        # the year archive at the top
    _whoi_archive(tmp_path / "copies" / "WHOI15_2007-2010" / "2007" / "train")   # the repository's copy, deeper
    with pytest.raises(ValueError, match=r"holds whoi15 more than once: .*2007 archive.* at .*; .*paper's code.*"
                                         r"WHOI15_2007-2010.*point --data-root at one of them"):
        folders.load_target("whoi15", root=str(tmp_path))


def test_an_undecodable_image_leaves_the_papers_test_images_as_they_were(tmp_path):
    _sipakmed(tmp_path / "s", slides=3)
    full = folders.load_target("sipakmed", root=str(tmp_path / "s"))
    broken = tmp_path / "s" / full.test.names[0]
    broken.write_bytes(b"not an image")
    t = folders.load_target("sipakmed", root=str(tmp_path / "s"), max_bad=1)
    assert t.test.names == full.test.names[1:] and t.train.names == full.train.names
    assert t.split_kind == folders.SPLITS["paper"] and [n for n, _ in t.bad] == [full.test.names[0]]


def test_every_run_records_its_split_with_a_sha256_per_image(tmp_path):
    _sipakmed(tmp_path / "s")
    cfg = train.Config(target="sipakmed", data_root=str(tmp_path / "s"), out=str(tmp_path / "run"))
    _, t, path = train.load_target(cfg)
    assert path == str(tmp_path / "run" / "splits" / "sipakmed-paper.json")
    record = json.loads(open(path).read())
    assert record["kind"] == "paper" and record["folder"] == t.path and list(record["test"]) == t.test.names
    name, digest = next(iter(record["train"].items()))
    assert digest == hashlib.sha256((tmp_path / "s" / name).read_bytes()).hexdigest()


def test_download_variations_are_one_line_naming_the_class_and_the_folder(tmp_path):
    _sipakmed(tmp_path / "one")                                             # a class with a single image
    for f in sorted((tmp_path / "one" / "im_Metaplastic" / "CROPPED").glob("*.bmp"))[1:]:
        os.remove(f)
    with pytest.raises(ValueError, match=r"class 'Metaplastic' in .*im_Metaplastic/CROPPED has 1 image; .*at least 2"):
        folders.load_target("sipakmed", root=str(tmp_path / "one"))
    _sipakmed(tmp_path / "few", slides=1)                                   # 15 images: 3 to test, 5 classes
    with pytest.raises(ValueError, match=r"15 images in .* are too few for the 80/20 split of 5 classes"):
        folders.load_target("sipakmed", root=str(tmp_path / "few"))
    (tmp_path / "zips").mkdir()                                             # zips never unpacked
    for c in folders.DATASETS["sipakmed"].classes:
        (tmp_path / "zips" / f"im_{c}.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"no class folders in .*zips; .*found: im_Dyskeratotic.zip"):
        folders.load_target("sipakmed", root=str(tmp_path / "zips"))
    _sipakmed(tmp_path / "case")                                            # Cropped/ for CROPPED/
    os.rename(tmp_path / "case" / "im_Koilocytotic" / "CROPPED", tmp_path / "case" / "im_Koilocytotic" / "Cropped")
    assert len(folders.load_target("sipakmed", root=str(tmp_path / "case")).classes) == 5
    _sipakmed(tmp_path / "mixed")                                           # one class nested twice
    os.rename(tmp_path / "mixed" / "im_Parabasal", tmp_path / "inner")
    (tmp_path / "mixed" / "im_Parabasal").mkdir()
    os.rename(tmp_path / "inner", tmp_path / "mixed" / "im_Parabasal" / "im_Parabasal")
    with pytest.raises(ValueError, match=r"mixes two nestings: Parabasal as im_<class>/im_<class>/CROPPED, the "
                                         r"other classes as im_<class>/CROPPED; unpack every class the same way"):
        folders.load_target("sipakmed", root=str(tmp_path / "mixed"))
    (tmp_path / "a-file").write_text("x")                                   # --data-root that is a file
    with pytest.raises(ValueError, match=r"--data-root .*a-file is a file, not a folder"):
        folders.load_target("sipakmed", root=str(tmp_path / "a-file"))
