"""The machinery around the science, for train.py and evaluate.py: one process or a rank of torchrun, what is
resolved at run time (backbone, weights file, device), the run folder (targets read with their bad-image lists
and content manifests, refusals that say in words what differs, cached results), the bookkeeping around the
training loop, and the one-line errors of the scripts.

Nothing here changes a number; a reader of the paper can skip this file.
"""
import collections
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch

import drl
import folders


def ranks():
    """(rank, world size) of this process: under torchrun its RANK of WORLD_SIZE, else 0 of 1."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------------------------------------------------
# 1. One process, or one rank of several under torchrun
# ---------------------------------------------------------------------------------------------------------

def say(msg):
    sys.stdout.write(_rank_prefix() + msg + "\n")  # one write: the lines of several ranks never interleave
    sys.stdout.flush()


def _rank_prefix():
    rank, world = ranks()
    return f"[rank {rank}/{world}] " if world > 1 else ""


# Several processes (torchrun): each rank trains and scores its share of the seed × β models (my_models);
# at the end every rank tells the others through torchrun's key-value store (a TCPStore) whether its share
# succeeded, and rank 0 writes the report from the checkpoints and caches they all wrote. Nothing else passes
# between ranks: the models are independent, so a weight never depends on the number of ranks. There is no
# process group: a gloo group's worker threads outlived destroy_process_group into interpreter shutdown,
# where one that exits is killed inside C++ code, and the rank aborted ("terminate called without an active
# exception", SIGABRT) in about one torchrun run in ten.

# The one piece of module state, for the whole process: under torchrun this rank's store client and whether the
# final exchange happened ("ranks"), and every checkpoint this process wrote, path -> step ("written", for the
# Ctrl-C and out-of-memory lines).
PROCESS = {"ranks": {}, "written": {}}


def join_ranks(res):
    """Under torchrun (WORLD_SIZE > 1), connect to its store at MASTER_ADDR:MASTER_PORT; torchrun's agent
    hosts it (TORCHELASTIC_USE_AGENT_STORE), other launchers leave it to rank 0."""
    if res.world > 1 and "store" not in PROCESS["ranks"]:
        import datetime
        host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and res.rank == 0
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), res.world,
                                           is_master=host, timeout=datetime.timedelta(days=7))
        PROCESS["ranks"].update(rank=res.rank, world=res.world, host=host, synced=False, store=store)


def wait_for_ranks(error=None):
    """Every rank says whether its share succeeded (`error`: its one-line message, or None) and hears the
    others. A failed rank elsewhere is raised here as one line naming it; one process returns at once."""
    me = PROCESS["ranks"]
    if "store" not in me or me["synced"]:
        return
    me["synced"] = True
    store, world = me["store"], me["world"]
    prefix = f"drl/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # a restarted run has fresh keys
    keys = [f"{prefix}status/{r}" for r in range(world)]
    try:
        store.set(keys[me["rank"]], json.dumps(error))
        store.wait(keys)
        errors = [json.loads(store.get(k)) for k in keys]
        store.add(prefix + "read", 1)
        while me["host"] and store.add(prefix + "read", 0) < world:  # the host stays until all have read
            time.sleep(0.01)
    except RuntimeError as e:  # the rank hosting the store died without a word (killed, out of memory)
        raise ValueError(f"another rank stopped without reporting ({drl.one_line(e)}); torchrun's summary "
                         f"names it; the finished checkpoints are kept: run the same command again to "
                         f"resume") from None
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed and error is None:
        raise ValueError(f"rank {failed[0]} of {len(errors)} failed ({errors[failed[0]]}); the checkpoints "
                         f"every rank finished are kept: run the same command again to resume")


def keep_freed_memory():
    """Process-wide: let glibc keep freed memory for reuse instead of returning it to the OS, so each ViT
    activation of a few MB is not page-faulted back in and zeroed (12,900 faults per image at batch 4, a
    tenth of the ViT's time on a 2-core CPU). No effect off glibc."""
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def setup_process(cfg, res):
    """Everything process-wide, in one place (both scripts call it once): glibc keeps freed memory, this rank
    joins the others under torchrun, and on CUDA the rank's GPU becomes the current device (else every rank
    opens a context on GPU 0) and fp32 matmuls and convolutions may use TF32 unless --no-tf32 (feature
    extraction turns TF32 off while it runs: fp32 Φ is fp32 on every device, see `features`)."""
    keep_freed_memory()
    join_ranks(res)
    if res.device.startswith("cuda"):
        torch.cuda.set_device(res.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not cfg.no_tf32


@contextlib.contextmanager
def exact_fp32(device):
    """TF32 off on CUDA while the block runs (fp32 features must not depend on --no-tf32), then as before."""
    if not str(device).startswith("cuda"):
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------
# 2. What is resolved at run time: the backbone actually used, its weights, the device
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Resolved:
    backbone: str          # "dino", a torchvision builder name or "pixels" (what "auto" became)
    weights: str = None    # the backbone's weights file
    device: str = "cpu"
    feature_dim: int = None  # size of Φ (None on pixels)
    precision: str = "fp32"  # of feature extraction (what "auto" became)
    rank: int = 0          # this process's place under torchrun (RANK of WORLD_SIZE); one process is 0 of 1
    world: int = 1

    @functools.cached_property
    def weights_digest(self):
        """sha256 of the weights file (None without one): in cache keys and configs, hashed once per run."""
        return file_digest(self.weights) if self.weights else None


def resolve_device(cfg):
    """dict(device, precision, rank, world): auto is cuda when a GPU is visible; under torchrun rank r of K
    takes cuda:$LOCAL_RANK. A CUDA device that is not there is an error, never a silent fallback."""
    rank, world = ranks()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: no CUDA GPU is visible to PyTorch here "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if device == "cuda" and world > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    return dict(device=device, precision=precision, rank=rank, world=world)


def resolve(cfg, announce=print):
    """Decide the backbone (auto = dino when its weights resolve, else pixels), its weights and the
    device; `announce` gets the one line that says which."""
    at = resolve_device(cfg)
    if cfg.backbone not in ("auto", "pixels") and cfg.arch == "se2":
        raise ValueError("--arch se2 works on pixels only; use --backbone pixels with --arch se2")
    if cfg.backbone == "pixels":
        return Resolved("pixels", None, **at)
    if cfg.backbone not in ("auto", "dino"):
        weights, how = drl.resolve_torchvision_weights(cfg.backbone, cfg.backbone_weights)
        res = Resolved(cfg.backbone, weights, feature_dim=drl.torchvision_feature_dim(cfg.backbone), **at)
        announce(f"backbone: torchvision {cfg.backbone} from {weights} ({how})")
        return res
    try:
        weights, how = drl.resolve_dino_weights(cfg.backbone_weights or cfg.dino_weights)
    except FileNotFoundError as e:
        if cfg.backbone == "dino" or cfg.dino_weights or cfg.backbone_weights:
            raise
        announce(f"backbone: {e}; falling back to --backbone pixels")
        return Resolved("pixels", None, **at)
    if cfg.arch == "se2":
        raise ValueError("--arch se2 works on pixels only; use --backbone pixels with --arch se2")
    announce(f"backbone: DINO ViT-B/16 from {weights} ({how})")
    return Resolved("dino", weights, feature_dim=drl.VIT_B16_CONFIG["embed_dim"], **at)


# ---------------------------------------------------------------------------------------------------------
# 3. The run folder: targets with their lists and manifests, refusals that say what differs, result caches
# ---------------------------------------------------------------------------------------------------------

def check_writable(folder):
    """--out must be creatable and writable; nothing is created here (a refused run leaves no folder)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        why = "is a file" if not os.path.isdir(probe) else "is not writable"
        raise OSError(f"cannot write to --out {folder} ({probe} {why}); choose a writable folder")


def load_target(cfg, save=True):
    """(cfg with --holdout-class spelled as the class is, the target dataset with every image decoded).
    Skipped images are listed on stderr and in out/bad-images-<target>.txt. With `save`, a random split is
    saved under out/splits/ and reused by later runs, and the content digest of every file goes to
    out/datasets/<digest>.json, so a later run can say what changed."""
    if not cfg.target:
        raise ValueError(f"--target is required for this stage; one of: {', '.join(folders.TARGETS)}")
    split_file = os.path.join(cfg.out, "splits", f"{cfg.target}.json")
    saved = read_split(split_file) if os.path.exists(split_file) else None
    try:
        target = folders.load_target(cfg.target, root=cfg.data_root, split=saved, split_name=split_file,
                                     max_bad=cfg.max_bad_images, by_slide=cfg.split_by_slide)
    except folders.BadImages as e:
        _list_bad_images(cfg, e.bad, save)
        raise ValueError(f"{e}" + (f"; the list is in {_bad_list_path(cfg)}" if save else "")) from None
    if cfg.holdout_class:
        cfg = dataclasses.replace(cfg, holdout_class=target.class_named(cfg.holdout_class))
    if target.bad:
        _list_bad_images(cfg, target.bad, save)
        warnings.warn(f"skipped {len(target.bad)} undecodable image(s) of {target.path}, listed above" +
                      (f" and in {_bad_list_path(cfg)}" if save else ""))
    if save and saved is None and target.split is not None:
        drl.write_text(split_file, json.dumps(target.split, indent=1))
    if save and target.files:
        drl.write_text(os.path.join(cfg.out, "datasets", f"{target.digest}.json"),
                       json.dumps({"folder": target.path, "files": target.files}))
    if save:
        say(describe(target, short=True))  # the first line of every run that reads a target
    return cfg, target


def check_data(cfg):
    """--check-data: the target read and validated as a run reads it, described; nothing written."""
    _, target = load_target(cfg, save=False)
    print(describe(target))


def describe(target, short=False):
    """What --check-data prints (short: the one line every run starts with)."""
    n_masks = len(target.train.with_masks) + len(target.test.with_masks)
    n = len(target.train) + len(target.test)
    where = f" at {target.path}" if target.path else ""
    if short:
        return (f"target {target.name}: {target.layout}{where}; {len(target.classes)} classes, {len(target.train)} "
                f"train / {len(target.test)} test images, {n_masks} with a mask; split: {target.split_kind}")
    width = max(len(c) for c in target.classes + ["class"])
    lines = [f"{target.name}: {target.layout}{where}", f"split: {target.split_kind}", "",
             f"{'class':<{width}}  {'train':>6}  {'test':>6}"]
    for k, c in enumerate(target.classes):
        n_train, n_test = int(np.sum(target.train.labels == k)), int(np.sum(target.test.labels == k))
        lines.append(f"{c:<{width}}  {n_train:>6}  {n_test:>6}")
    lines += [f"{'total':<{width}}  {len(target.train):>6}  {len(target.test):>6}", "",
              f"masks: {n_masks} of {n} images have a usable one" if n_masks else "masks: none"]
    skipped = [f"{len(target.bad)} undecodable image(s)"] if target.bad else []
    if target.left_out:
        skipped.append(f"{len(target.left_out)} class folder(s) the paper does not use ({', '.join(target.left_out)})")
    if target.ignored:
        skipped.append(f"{target.ignored} other file(s) in the image folders")
    lines.append("skipped: " + ("; ".join(skipped) if skipped else "nothing"))
    return "\n".join(lines)


def read_split(path):
    """A split saved by an earlier run: dict with "train" and "test" lists of image names."""
    try:
        with open(path) as f:
            saved = json.load(f)
        return {"train": list(saved["train"]), "test": list(saved["test"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"split file {path} is not a valid split ({e}); delete it to re-split") from None


def _bad_list_path(cfg):
    return os.path.join(cfg.out, f"bad-images-{cfg.target}.txt")


def _list_bad_images(cfg, bad, save=True):
    for name, reason in bad:
        print(f"bad image: {name}: {reason}", file=sys.stderr)
    if save:
        drl.write_text(_bad_list_path(cfg), "".join(f"{name}\t{reason}\n" for name, reason in bad))


def dataset_difference(cfg, there, now):
    """In words, how the target of digest `now` differs from the one of digest `there` (from the content
    manifests under out/datasets/), e.g. '12 images added and 3 changed in data/vacuoles/train'."""
    manifests = []
    for digest in (there, now):
        path = os.path.join(cfg.out, "datasets", f"{digest}.json")
        if not os.path.exists(path):
            return "the target images differ"
        with open(path) as f:
            manifests.append(json.load(f))
    old, new = manifests[0]["files"], manifests[1]["files"]
    counts = collections.Counter()
    for name in set(old) | set(new):
        what = "added" if name not in old else "removed" if name not in new else \
            "changed" if old[name] != new[name] else None
        if what:
            counts[(what, os.path.join(manifests[1]["folder"], os.path.dirname(name)))] += 1
    if not counts:
        return "the same files with other labels or split"
    return "; ".join(f"{n} file(s) {what} in {folder}" for (what, folder), n in sorted(counts.items()))


def explain_difference(cfg, key, there, now):
    if key == "target":
        return dataset_difference(cfg, there, now)
    if key == "dataset":
        return "the Texture-dSprites source differs (--textures or --dsprites is not as in that run)"
    if key == "backbone_weights":
        return "the backbone weights differ (--backbone-weights or --dino-weights is not as in that run)"
    if key == "precision" and there:  # e.g. models trained on a GPU (bf16 Φ), evaluated on a CPU
        return (f"those models were trained on {there} features, this run makes {now} ones; add --precision "
                f"{there} to use them")
    if key == "source":  # the finetuned model's source model: say which of its settings differs
        sub = sorted(k for k in set(there) | set(now) if there.get(k) != now.get(k))[0]
        return explain_difference(cfg, sub, there.get(sub), now.get(sub))
    return _flag_difference(key, there, now)


def check_config(path, saved, wanted, explain=None):
    """A checkpoint of another configuration is refused; `explain(key, there, now)` may say in words what
    differs (e.g. which images changed)."""
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff:
        k = diff[0]
        words = (explain or _flag_difference)(k, saved.get(k), wanted.get(k))
        raise ValueError(f"{path} was made from other data or flags: {words}; use another --out, or delete "
                         f"{os.path.dirname(path)} to train that model again")


def _flag_difference(key, there, now):
    return f"--{key.replace('_', '-')} is {there!r} there, {now!r} now"


@contextlib.contextmanager
def stage(what, every_s=5.0):
    """Say what is being computed now and every few seconds until it is done."""
    say(f"evaluate: {what}")
    t0, stop = time.time(), threading.Event()

    def beat():
        while not stop.wait(every_s):
            say(f"evaluate: {what} ... {time.time() - t0:.0f} s")
    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()


def file_digest(path):
    """sha256 hex digest of a file (weights, checkpoints), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(**parts):
    """Short sha256 over a canonical JSON of everything that changes a cached result (for features:
    dataset digest, weights digest, preprocessing, precision, ...). The caller builds the file name."""
    def plain(o):
        if isinstance(o, (np.generic, np.ndarray)):
            return o.tolist()
        raise ValueError(f"cache key part of type {type(o).__name__} is not JSON-able")
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(out, parts, compute):
    """compute() once per key: the JSON of its result is kept under out/eval-cache/, keyed by `parts`
    (everything that changes it). The result is always the JSON round trip, fresh or cached, so a
    cached run writes the same report as the run that computed it."""
    key = cache_key(**parts)
    path = os.path.join(out, "eval-cache", f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), key
    text = json.dumps(compute(), default=json_default)
    drl.write_text(path, text)
    return json.loads(text), key


def scored(what, fn):
    with stage(what):
        return fn()


def lazy_model(path, device):
    """A function that loads the checkpoint's model on its first call only."""
    return functools.lru_cache(maxsize=1)(lambda: drl.load_model(path, device)[0])


def json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------------------------------------------------
# 4. Around the training loop: log.csv, the recent rate, progress lines, what was written, compiler errors
# ---------------------------------------------------------------------------------------------------------

class CsvLog:
    """folder/log.csv: one row per log interval; rows past the checkpoint of an interrupted run are dropped."""
    HEADER = ["step", "loss", "recon", "kl", "beta", "seconds"]

    def __init__(self, folder, start):
        path = os.path.join(folder, "log.csv")
        rows = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= start]
        with drl.atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([self.HEADER] + rows)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)

    def write(self, step, losses, beta, seconds):
        self.writer.writerow([step] + [f"{v:.6g}" for v in losses] + [f"{beta:.4g}", f"{seconds:.1f}"])
        self.file.flush()

    def close(self):
        self.file.close()


class RecentRate:
    """Steps per second over the last ~30 s: a rate since the start drifts under changing load."""

    def __init__(self, step, window=30.0):
        self.points, self.window = collections.deque([(time.time(), step)]), window

    def __call__(self, step):
        now = time.time()
        self.points.append((now, step))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.popleft()
        t, s = self.points[0]
        return (step - s) / max(now - t, 1e-9)


def printer(label):
    def progress(info):
        say(f"[{label}] step {info['step']}/{info['steps']} loss {info['loss']:.2f} beta {info['beta']:.2f} | "
            f"{info['steps_per_s']:.1f} steps/s, ETA {info['eta_s'] / 60:.1f} min")
    return progress


@contextlib.contextmanager
def compiling(first):
    """The first compiled step builds the kernels: a compiler that fails (none installed, an unsupported
    device) becomes one line instead of a long traceback. Errors that are not the compiler's pass unchanged:
    our own ValueErrors, and an out-of-memory (also when the compiler's autotuning ran out), which run_main
    turns into its own line."""
    try:
        yield
    except Exception as e:
        oom = out_of_memory(e)
        if oom is not None:
            raise oom from None
        if not first or isinstance(e, ValueError):
            raise
        raise ValueError(f"--compile: torch.compile failed here ({type(e).__name__}: {drl.one_line(e)}); run "
                         f"without --compile") from None


def out_of_memory(e):
    """The torch.cuda.OutOfMemoryError in e's chain of causes (compilers wrap the errors they meet), else None."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return e
        e = e.__cause__ or getattr(e, "inner_exception", None)
    return None


# ---------------------------------------------------------------------------------------------------------
# 5. The scripts: one line per error, Ctrl-C keeps what was written
# ---------------------------------------------------------------------------------------------------------

def interrupted_message():
    """What Ctrl-C leaves behind, in one line."""
    written = PROCESS["written"]
    if not written:
        return "interrupted before this run wrote a checkpoint; run the same command again to start"
    path, step = list(written.items())[-1]
    return (f"interrupted: {len(written)} checkpoint(s) of this run are kept, the last {path} at step {step}; "
            f"run the same command again to resume")


def _interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def run_main(main):
    """Run a script's main(): library errors become one line on stderr and exit code 2, no traceback."""
    warnings.formatwarning = lambda m, c, *a, **k: f"{_rank_prefix()}warning: {m}\n"
    if ranks()[1] > 1:  # torchrun stops the other ranks with SIGTERM when one fails
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except KeyboardInterrupt as e:
        why = ("stopped by torchrun, which stops every rank when one fails (its summary names it); "
               if str(e) == "SIGTERM" else "")
        print(_rank_prefix() + why + interrupted_message(), file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        message = _oom_message(e) if isinstance(e, torch.cuda.OutOfMemoryError) else str(e)
        print(f"{_rank_prefix()}error: {message}", file=sys.stderr, flush=True)
        wait_for_ranks(message)  # under torchrun: the other ranks learn that this one failed
        sys.exit(2)


def _oom_message(e):
    written = PROCESS["written"]
    kept = f"the {len(written)} checkpoint(s) this run wrote are kept" if written else "no checkpoint was written"
    return (f"out of GPU memory ({drl.one_line(e, 100)}); lower --batch-size, or train fewer models per process "
            f"(without --parallel-models, or with more torchrun ranks); {kept}, and the same command resumes")
