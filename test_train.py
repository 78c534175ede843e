"""Tests of the training loop, --parallel-models and the train.py command line (train.py)."""
import dataclasses
import hashlib
import os

import numpy as np
import pytest
import torch

import data
import drl
import evaluate
import folders
import metrics
import se2
import train
from test_data import _textures_folder
from conftest import TINY, assert_one_line_error, run_script


N_PAIRS = 2048


def _feature_bank(n_dim=8):
    """Rows i and N_PAIRS + i are a pair: 3 gaussian factors, one of them redrawn, through a fixed linear map;
    the last row is NaN (for the divergence test)."""
    g = torch.Generator().manual_seed(0)
    basis, f1 = torch.randn(3, n_dim, generator=g), torch.randn(N_PAIRS, 3, generator=g)
    f2 = f1.clone()
    f2[torch.arange(N_PAIRS), torch.randint(0, 3, (N_PAIRS,), generator=g)] = torch.randn(N_PAIRS, generator=g)
    return torch.cat([f1 @ basis, f2 @ basis, torch.full((1, n_dim), float("nan"))])


def _feature_batches(seed, step):
    i = np.random.default_rng((seed, step)).integers(0, N_PAIRS, size=32)
    return np.stack([i, i + N_PAIRS])


def _run(folder, seed=0, beta=1.0, config=None):
    torch.manual_seed(seed)
    return train.Run(drl.FeatureVAE(in_dim=8, hidden=16, latent_dim=4), seed, beta, str(folder),
                     config or {"seed": seed, "beta": beta})


def _fit(folder, steps, batch_fn=None, **kw):
    run = _run(folder)
    ckpt = train.fit([run], _feature_bank(), batch_fn or _feature_batches, steps=steps, lr=3e-3, warmup_steps=10,
                     **kw)[0]
    return run.model, ckpt


def test_fit_lowers_loss_and_writes_log(tmp_path):
    _, ckpt = _fit(tmp_path, 300, log_every=50)
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert rows[0].split(",") == ["step", "loss", "recon", "kl", "beta"]
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(50, 301, 50))
    first, last = float(rows[1].split(",")[1]), float(rows[-1].split(",")[1])
    assert last < 0.5 * first
    assert ckpt["done"] and ckpt["step"] == 300 and ckpt["loss"] == pytest.approx(last, rel=1e-5)


class _Interrupt(Exception):
    pass


def _interrupted_at(step, batch_fn):
    def fn(seed, s):
        if s == step:
            raise _Interrupt
        return batch_fn(seed, s)
    return fn


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, _ = _fit(tmp_path / "a", 120, log_every=10)
    with pytest.raises(_Interrupt):  # checkpoints at every log step (10, 20, ...), interrupted at step 75
        _fit(tmp_path / "b", 120, _interrupted_at(75, _feature_batches), log_every=10, checkpoint_every_s=0)
    assert drl.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 70
    resumed, ckpt = _fit(tmp_path / "b", 120, log_every=10)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = ((tmp_path / d / "log.csv").read_text().splitlines() for d in "ab")
    assert [r.split(",")[:5] for r in a] == [r.split(",")[:5] for r in b]  # rows 80..120 once, same numbers


def test_resume_with_other_config_is_refused(tmp_path):
    _fit(tmp_path, 20)
    with pytest.raises(ValueError, match="trained with other settings: beta is 1.0 there, 2.0 now"):
        train.fit([_run(tmp_path, beta=2.0)], _feature_bank(), _feature_batches, steps=20)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def nan_from_step_20(seed, step):
        i = _feature_batches(seed, step)
        if step >= 20:
            i[0, 0] = 2 * N_PAIRS  # the NaN row of the bank
        return i

    with pytest.raises(train.TrainingDiverged, match=r"loss became nan by step 30 \(seed 0, beta 1.0\)"):
        _fit(tmp_path, 40, nan_from_step_20, log_every=10, checkpoint_every_s=0)
    ckpt = drl.load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 20 and not ckpt["done"]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


SEEDS, BETAS = [0, 1, 0], [1.0, 1.0, 2.0]  # two runs share a seed (a batch stream), as β = 1 and β = 2 do


def _stack_runs(root, make):
    out = []
    for s, b in zip(SEEDS, BETAS):
        torch.manual_seed(s)
        out.append(train.Run(make(), s, b, os.path.join(root, f"b{b:g}-s{s}"), {"seed": s, "beta": b}))
    return out


def _sampled(x, n, paired):
    """(x, batch_fn) for train.fit: n random pairs (2, n) or images (n,) of x per step."""
    def batch_fn(seed, step):
        i = np.random.default_rng((seed, step)).integers(0, len(x), (2, n))
        return i if paired else i[0]
    return x, batch_fn


def _relative_difference(a, b):
    """‖a − b‖ / ‖a‖ over every tensor of two state dicts."""
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a)
    return float(num.sqrt() / sum(a[k].double().pow(2).sum() for k in a).sqrt())


def _alone_vs_stacked(tmp_path, make, sampled, steps, **kw):
    kw = dict(steps=steps, warmup_steps=steps // 4, log_every=10, **kw)
    alone = train.fit(_stack_runs(tmp_path / "alone", make), *sampled, **kw)
    stacked = train.fit_stacked(_stack_runs(tmp_path / "stacked", make), *sampled, **kw)
    return alone, stacked


@pytest.mark.parametrize("paired, optimizer", [(True, "adam"), (False, "adamw")])
def test_stacked_feature_vaes_equal_their_runs_alone(tmp_path, paired, optimizer):
    make = lambda: drl.FeatureVAE(in_dim=48, hidden=32, latent_dim=6)  # noqa: E731
    alone, stacked = _alone_vs_stacked(tmp_path, make, _sampled(torch.randn(200, 48), 16, paired), 100,
                                       optimizer=optimizer, weight_decay=0.01 if optimizer == "adamw" else 0.0)
    for a, s in zip(alone, stacked):
        assert (a["step"], a["done"], a["config"]) == (s["step"], s["done"], s["config"])
        assert _relative_difference(a["model"], s["model"]) <= 1e-4
        assert _relative_difference(a["optimizer"]["state"][0], s["optimizer"]["state"][0]) <= 1e-4
    assert _relative_difference(stacked[0]["model"], stacked[1]["model"]) > 0.1  # they trained apart
    logs = [(tmp_path / d / "b2-s0" / "log.csv").read_text().splitlines() for d in ("alone", "stacked")]
    assert [r.split(",")[0] for r in logs[0]] == [r.split(",")[0] for r in logs[1]]


def test_stacked_conv_vaes_equal_their_runs_alone_after_a_step(tmp_path):
    # Under vmap the convolutions of the stack run as one grouped convolution, which rounds differently
    # (2e-8 after one step). Training amplifies any rounding change (1 vs 2 threads: ~1e-2 after 100 steps),
    # so the first step is where the stack is compared.
    alone, stacked = _alone_vs_stacked(tmp_path, lambda: drl.ConvVAE(latent_dim=4),
                                       _sampled(torch.rand(40, 3, 64, 64), 4, True), 1)
    for a, s in zip(alone, stacked):
        assert _relative_difference(a["model"], s["model"]) <= 1e-6


def test_stack_resumes_models_at_different_steps(tmp_path):
    make = lambda: drl.FeatureVAE(in_dim=48, hidden=32, latent_dim=6)  # noqa: E731
    (x, batch_fn), kw = _sampled(torch.randn(200, 48), 16, True), dict(log_every=10, checkpoint_every_s=0)
    full = train.fit_stacked(_stack_runs(tmp_path / "full", make), x, batch_fn, steps=60, **kw)
    runs = _stack_runs(tmp_path / "part", make)
    train.fit(runs[:1], x, batch_fn, steps=60, **kw)                   # model 0 alone, finished
    with pytest.raises(_Interrupt):                                    # models 1 and 2 stacked, stopped at 35
        train.fit_stacked(runs[1:], x, _interrupted_at(35, batch_fn), steps=60, **kw)
    assert [drl.load_checkpoint(os.path.join(r.folder, "checkpoint.pt"))["step"] for r in runs] == [60, 30, 30]
    resumed = train.fit_stacked(_stack_runs(tmp_path / "part", make), x, batch_fn, steps=60, **kw)
    for a, b in zip(full, resumed):
        assert b["done"] and _relative_difference(a["model"], b["model"]) <= 1e-4


def test_stack_refuses_models_with_batchnorm(tmp_path):
    runs = [train.Run(se2.SE2VAE(n_iso=2, n_ori=1, width=(1, 1, 1)), s, 1.0, str(tmp_path / str(s)), {})
            for s in (0, 1)]
    with pytest.raises(ValueError, match="BatchNorm.*--parallel-models"):
        train.fit_stacked(runs, *_sampled(torch.rand(8, 3, 64, 64), 2, True), steps=2)


def _nonlinear_mixing(out_dim=32):
    """Features = a fixed random 2-layer tanh network of the five Texture-dSprites factors (scaled to [-1, 1]),
    standardised. The tanh layer folds the factors nonlinearly, so no linear map of the features returns them."""
    g = torch.Generator().manual_seed(0)
    w1, b1, w2 = torch.randn(5, 64, generator=g) * 2, torch.randn(64, generator=g), torch.randn(64, out_dim, generator=g) / 8
    top = np.array(data.FACTOR_SIZES) - 1.0

    def raw(f):
        return torch.tanh((torch.as_tensor(f / top, dtype=torch.float32) * 2 - 1) @ w1 + b1) @ w2
    grid = raw(np.stack(np.unravel_index(np.arange(int(np.prod(data.FACTOR_SIZES))), data.FACTOR_SIZES), 1))
    return lambda f: (raw(f) - grid.mean(0)) / grid.std(0)


@pytest.mark.slow  # ~2 min on one core
def test_adagvae_identifies_nonlinearly_mixed_factors_and_betavae_does_not(tmp_path):
    mix, sizes = _nonlinear_mixing(), data.FACTOR_SIZES
    rng = np.random.default_rng(123)
    f_train, f_test = (np.stack([rng.integers(0, s, n) for s in sizes], 1) for n in (2000, 1000))

    grid = np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), 1)
    bank = mix(grid)  # the mixed features of every grid point, addressed by the factors' flat index

    def batches(paired):
        def batch_fn(seed, step):
            r = np.random.default_rng((seed, step))
            if paired:
                f1, f2, _ = data.sample_pairs(sizes, 64, r)
                return np.stack([np.ravel_multi_index(f1.T, sizes), np.ravel_multi_index(f2.T, sizes)])
            return np.ravel_multi_index(data.sample_factors(sizes, 64, r).T, sizes)
        return batch_fn

    scores = {}
    for method in ("adagvae", "betavae"):
        torch.manual_seed(0)
        run = train.Run(drl.FeatureVAE(in_dim=32, hidden=64, latent_dim=10), 0, 1.0, str(tmp_path / method), {})
        train.fit([run], bank, batches(method == "adagvae"), steps=8000, lr=1e-3, warmup_steps=1000)
        z_train, z_test = (run.model.eval().representation(mix(f)).numpy() for f in (f_train, f_test))
        scores[method] = (metrics.dci(z_train, f_train, z_test, f_test)["disentanglement"],
                          metrics.mig(z_train, f_train))
    print("identifiability (DCI D, MIG):", scores)
    assert scores["adagvae"][0] >= 0.8 and scores["adagvae"][1] >= 0.5
    assert scores["betavae"][0] <= scores["adagvae"][0] - 0.2 and scores["betavae"][1] <= scores["adagvae"][1] - 0.2


def test_train_auto_falls_back_to_pixels_in_one_line(tmp_path, offline_hub, capsys):
    code, out, err = run_script(train.main, ["--stage", "source", "--out", str(tmp_path / "r")] + TINY, capsys)
    assert code == 0, err
    fallback = [line for line in out.splitlines() if line.startswith("backbone:")]
    assert len(fallback) == 1 and "falling back to --backbone pixels" in fallback[0]
    ckpt = drl.load_checkpoint(str(tmp_path / "r/source/pixels-conv-adagvae-z4-3steps/beta1-seed0/checkpoint.pt"))
    assert ckpt["config"]["backbone"] == "pixels" and ckpt["done"]


@pytest.mark.parametrize("case", ["dino-without-weights", "foreign-weights", "three-textures", "wrong-dsprites",
                                  "unwritable-out", "zero-steps", "unknown-target"])
def test_train_bad_input_is_one_clear_line(case, tmp_path, offline_hub, capsys):
    out = tmp_path / "r"
    argv = ["--stage", "source", "--out", str(out)] + TINY
    words = []
    if case == "dino-without-weights":
        argv += ["--backbone", "dino"]
        words = ["no DINO ViT-B/16 weights", "--dino-weights"]
    elif case == "foreign-weights":
        bad = tmp_path / "resnet.pth"
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
        argv += ["--backbone", "dino", "--dino-weights", str(bad)]
        words = [str(bad)]
    elif case == "three-textures":
        argv += ["--textures", str(_textures_folder(tmp_path, 3))]
        words = ["3", "--textures"]
    elif case == "wrong-dsprites":
        bad = tmp_path / "dsprites.npz"
        np.savez(bad, images=np.zeros((3, 64, 64), np.uint8))
        argv += ["--dsprites", str(bad)]
        words = [str(bad)]
    elif case == "unwritable-out":
        (tmp_path / "a-file").write_text("x")
        argv[argv.index("--out") + 1] = str(tmp_path / "a-file" / "runs")
        words = ["a-file/runs", "Not a directory"]
    elif case == "zero-steps":
        argv[argv.index("--steps") + 1] = "0"
        words = ["--steps"]
    elif case == "unknown-target":
        argv = ["--stage", "finetune", "--target", "mnist", "--out", str(out)] + TINY
        words = ["mnist", "synthetic-cells"]
    code, _, err = run_script(train.main, argv, capsys)
    assert_one_line_error(code, err, *words)
    assert not list(tmp_path.rglob("*.tmp")), "a partial file was left behind"
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_train_refuses_to_reuse_a_model_of_another_configuration(tmp_path, offline_hub, capsys):
    argv = ["--stage", "source", "--out", str(tmp_path / "r")] + TINY
    assert run_script(train.main, argv, capsys)[0] == 0
    path = tmp_path / "r/source/pixels-conv-adagvae-z4-3steps/beta1-seed0/checkpoint.pt"
    before = path.read_bytes()
    code, _, err = run_script(train.main, argv + ["--lr", "0.001"], capsys)
    assert_one_line_error(code, err, "other settings: lr is 0.0001 there, 0.001 now", "use another --out, or delete")
    assert path.read_bytes() == before


def test_train_nan_loss_stops_with_one_line_and_keeps_no_bad_checkpoint(tmp_path, offline_hub, capsys):
    argv = ["--stage", "source", "--out", str(tmp_path / "r"), "--lr", "1e30"] + TINY
    argv[argv.index("--steps") + 1] = "40"
    code, _, err = run_script(train.main, argv, capsys)
    assert_one_line_error(code, err)
    assert "nan" in err.lower() or "finite" in err.lower()
    for ckpt in tmp_path.rglob("checkpoint.pt"):
        state = drl.load_checkpoint(str(ckpt))
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_train_parallel_models_equals_one_by_one(tmp_path, offline_hub, capsys):
    # conv VAEs: stacked, one grouped convolution rounds differently, so one step (see the stacked-conv test)
    argv = ["--stage", "source", "--steps", "1", "--seeds", "0", "1", "--betas", "1", "2", "--batch-size", "4",
            "--latent-dim", "4"]
    assert run_script(train.main, argv + ["--out", str(tmp_path / "seq")], capsys)[0] == 0
    code, out, err = run_script(train.main, argv + ["--out", str(tmp_path / "par"), "--parallel-models"], capsys)
    assert code == 0, err
    assert "stacked (--parallel-models)" in out
    for beta in (1, 2):
        for seed in (0, 1):
            rel = f"source/pixels-conv-adagvae-z4-1steps/beta{beta}-seed{seed}/checkpoint.pt"
            a = drl.load_checkpoint(str(tmp_path / "seq" / rel))["model"]
            b = drl.load_checkpoint(str(tmp_path / "par" / rel))["model"]
            assert _relative_difference(a, b) <= 1e-6, rel


def test_train_se2_arch_runs_and_its_representation_has_angles(tmp_path, offline_hub, capsys):
    argv = ["--stage", "source", "--arch", "se2", "--out", str(tmp_path / "r")] + TINY
    code, _, err = run_script(train.main, argv, capsys)
    assert code == 0, err
    model, ckpt = drl.load_model(str(tmp_path / "r/source/pixels-se2-adagvae-z4-3steps/beta1-seed0/checkpoint.pt"))
    assert isinstance(model, se2.SE2VAE) and ckpt["done"]
    z = model.representation(torch.rand(2, 3, 64, 64))
    n_ori = model.config["n_ori"]
    assert z.shape == (2, 4 + 2 * n_ori)
    cos_sin = z[:, 4:].reshape(2, n_ori, 2)
    assert torch.allclose(cos_sin.pow(2).sum(-1), torch.ones(2, n_ori), atol=1e-5)  # unit vectors: angles


def test_ctrl_c_is_one_line_and_keeps_the_checkpoints(tmp_path, offline_hub, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_source", interrupted)
    code, _, err = run_script(train.main, ["--stage", "source", "--out", str(tmp_path / "r")] + TINY, capsys)
    assert code == 130 and err.count("\n") == 1 and "kept" in err and "run the same command again" in err


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_write_the_checkpoints_of_one_process_bitwise(tmp_path, capsys):
    """`torchrun --nproc-per-node=2 train.py`: rank 0 trains models 0 and 2, rank 1 model 1, each exits with its
    own status; every checkpoint file equals, byte for byte, the one a single process writes."""
    import subprocess
    import sys
    argv = ["--stage", "source", "--backbone", "pixels", "--steps", "3", "--seeds", "0", "1", "2", "--betas", "1",
            "--batch-size", "4", "--latent-dim", "4"]
    code, _, err = run_script(train.main, argv + ["--out", str(tmp_path / "one")], capsys)
    assert code == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "hub"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={_free_port()}", "train.py"] + argv + ["--out", str(tmp_path / "two")],
                         cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "training 2 model(s)" in run.stdout and "training 1 model(s)" in run.stdout
    for seed in (0, 1, 2):
        rel = f"source/pixels-conv-adagvae-z4-3steps/beta1-seed{seed}/checkpoint.pt"
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_torchrun_rank_r_of_k_takes_every_kth_model_and_an_idle_rank_says_so(capsys):
    cfg = train.Config(seeds=(0, 1, 2), betas=(1.0, 2.0))
    shares = [train.my_models(cfg, train.Resolved("pixels", rank=r, world=4)) for r in range(4)]
    assert shares == [[(1.0, 0), (2.0, 1)], [(1.0, 1), (2.0, 2)], [(1.0, 2)], [(2.0, 0)]]
    assert train.my_models(cfg, train.Resolved("pixels", rank=6, world=7)) == []
    assert "rank 6 of 7: no model to train (6 model(s) in all)" in capsys.readouterr().out


def test_out_of_memory_is_one_line_naming_what_to_lower(tmp_path, offline_hub, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train_step", oom)
    code, _, err = run_script(train.main, ["--stage", "source", "--out", str(tmp_path / "r")] + TINY, capsys)
    assert_one_line_error(code, err, "out of GPU memory", "Tried to allocate 2.00 GiB", "--batch-size",
                          "--parallel-models", "resumes")


@pytest.mark.fake_cuda
def test_checkpoints_hold_cpu_tensors_and_keep_their_containers(fake_cuda):
    """What a GPU run saves goes through drl._on_cpu: tensors off the CPU come back to it, CPU tensors are kept
    as they are, and containers keep type and attributes (a state_dict's _metadata)."""
    sd = drl.FeatureVAE(8, 4, 2).state_dict()
    with fake_cuda[0]:
        moved = drl._on_cpu({"model": sd, "gpu": [torch.zeros(3, device="cuda")]})
    assert type(moved["model"]) is type(sd) and moved["model"]._metadata == sd._metadata
    assert moved["model"]["encoder.0.weight"] is sd["encoder.0.weight"] and moved["gpu"][0].device.type == "cpu"


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, offline_hub, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_script(train.main, ["--stage", "source", "--device", "cuda", "--out", str(tmp_path / "r")]
                              + TINY, capsys)
    assert_one_line_error(code, err, "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "r").exists()


def _fake_fit(fake_cuda, runs, x, batch_fn, steps=4, stack=False, **kw):
    """fit() on the fake "cuda" for `steps` steps, stopped before the first log step (which reads the losses
    back, as it should); returns DeviceTraffic."""
    mode, traffic = fake_cuda
    traffic.reset()
    with mode, traffic, pytest.raises(_Interrupt):
        (train.fit_stacked if stack else train.fit)(runs, x.to("cuda"), _interrupted_at(steps, batch_fn), steps=1000,
                                                    log_every=1000, warmup_steps=10, **kw)
    return traffic


def _assert_never_waits(traffic, steps):
    """Each step: exactly one copy, the indices, host -> device and non-blocking; no copy back; no read."""
    assert sorted(k for k in traffic.copies if k != "setup") == list(range(steps))
    for step in range(steps):
        assert traffic.copies[step] == [("cpu->cuda", True)], (step, traffic.copies[step])
        assert traffic.reads[step] == [], (step, traffic.reads[step])


FAKE_CASES = {"feature, one": (lambda: drl.FeatureVAE(48, 32, 6), 1, "features"),
              "feature, stack of 3": (lambda: drl.FeatureVAE(48, 32, 6), 3, "features"),
              "conv, one": (lambda: drl.ConvVAE(latent_dim=4), 1, "pixels"),
              "conv, stack of 2": (lambda: drl.ConvVAE(latent_dim=4), 2, "pixels"),
              "se2, one": (lambda: se2.SE2VAE(n_iso=2, n_ori=1, width=(1, 1, 1)), 1, "pixels")}


@pytest.mark.fake_cuda
@pytest.mark.parametrize("case", list(FAKE_CASES))
@pytest.mark.parametrize("paired", [True, False], ids=["pairs", "images"])
def test_fake_cuda_step_never_waits_for_the_host(case, paired, tmp_path, fake_cuda):
    make, n, kind = FAKE_CASES[case]
    x = torch.randn(64, 48) if kind == "features" else torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    runs = [train.Run(make(), s, 1.0 + s % 2, str(tmp_path / str(s)), {}) for s in range(n)]
    _assert_never_waits(_fake_fit(fake_cuda, runs, *_sampled(x, 8, paired), stack=n > 1), 4)


@pytest.mark.fake_cuda
def test_fake_cuda_harness_catches_a_device_mix_a_blocking_copy_and_a_read(tmp_path, fake_cuda):
    """The harness can fail: a dataset left on the CPU mixes devices in the step, and a pageable copy and an
    .item() are recorded as what they are."""
    mode, traffic = fake_cuda
    x, batch_fn = _sampled(torch.randn(64, 48), 8, True)
    run = train.Run(drl.FeatureVAE(48, 32, 6), 0, 1.0, str(tmp_path), {})
    with mode, pytest.raises(Exception, match="cuda|cpu"):
        run.model.to("cuda")
        train.train_step(run.model, train.make_optimizer(run.model.parameters()), train.get_batch(x, batch_fn(0, 0)),
                         1.0)
    traffic.reset()
    with mode, traffic:
        traffic.step = 0
        y = torch.ones(3).to("cuda")
        with pytest.raises(Exception):
            y.sum().item()
    assert traffic.copies[0] == [("cpu->cuda", False)] and traffic.reads[0] == ["aten._local_scalar_dense.default"]


@pytest.mark.fake_cuda
def test_fake_cuda_source_stage_and_finetuning_resumed_from_a_cpu_checkpoint(tmp_path, fake_cuda, monkeypatch):
    """The pipeline's own inputs and batches: Texture-dSprites pixels (SourceInputs) for the source stage, the
    synthetic-cells train split (epoch_batches) for finetuning, each resuming a checkpoint written on the CPU."""
    monkeypatch.setattr(data, "SYNTHETIC_N", 200)
    cfg = train.Config(backbone="pixels", latent_dim=4, out=str(tmp_path))
    res = train.Resolved("pixels", device="cuda")
    src = train.SourceInputs(cfg, dataclasses.replace(res, device="cpu"))
    batches = src.batches(16, paired=True)
    make = lambda s: train.Run(drl.ConvVAE(latent_dim=4), s, 1.0, str(tmp_path / f"src{s}"), {"s": s})  # noqa: E731
    with pytest.raises(_Interrupt):  # 3 steps on the CPU, checkpointed
        train.fit_stacked([make(0), make(1)], src.x, _interrupted_at(4, batches), steps=1000, log_every=3,
                          checkpoint_every_s=0, warmup_steps=10)
    traffic = _fake_fit(fake_cuda, [make(0), make(1)], src.x, batches, steps=6, stack=True)
    assert traffic.copies["setup"] and not traffic.reads["setup"]  # the CPU checkpoints' weights went over
    assert sorted(k for k in traffic.copies if k != "setup") == [3, 4, 5]
    for step in range(3, 6):
        assert traffic.copies[step] == [("cpu->cuda", True)] and not traffic.reads[step]
    target = folders.load_target("synthetic-cells")
    x = train.target_inputs(cfg, res, target.train, None, "synthetic-cells-train")
    assert x.device.type == "cpu"  # the caller moves it (finetune: .to(res.device))
    run = train.Run(drl.load_model(str(tmp_path / "src0" / "checkpoint.pt"))[0], 0, 1.0, str(tmp_path / "ft"), {})
    _assert_never_waits(_fake_fit(fake_cuda, [run], x, train.epoch_batches(len(x), 16), steps=4, optimizer="adamw",
                                  weight_decay=0.01), 4)


def _readme_commands():
    """Every `python X.py ...` command in the README's code blocks, as argument lists."""
    import shlex
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    blocks = readme.split("```")[1::2]
    commands = []
    for line in (line for b in blocks for line in b.splitlines()):
        for part in line.split("#")[0].split("&&"):
            words = shlex.split(part)
            if words[:1] == ["python"] and words[1:2] and words[1].endswith(".py"):
                commands.append(words[1:])
            elif words[:1] == ["torchrun"]:  # torchrun's own flags, then the script and its flags
                commands.append(next(words[i:] for i, w in enumerate(words) if w.endswith(".py")))
    return commands


def test_readme_commands_run_as_written():
    """After the quickstart the venv is active: every command says `python`, names a script of this
    project, and its flags parse into a valid Config (the commands themselves take hours)."""
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    assert ".venv/bin/python" not in readme and "../" + "shared" not in readme
    commands = _readme_commands()
    assert len(commands) >= 5
    scripts = {"train.py": (train.parser, train.config_from_args),
               "evaluate.py": (evaluate.parser, evaluate.config_from_args)}
    for cmd in commands:
        assert cmd[0] in scripts, cmd
        parser, config = scripts[cmd[0]]
        config(parser().parse_args(cmd[1:]))


def test_nothing_points_outside_the_repository():
    """Code, comments and README cite papers and repositories by name: no issue numbers, no design-contract or
    reference-note section labels, no paths into a folder beside the checkout (a public clone has none)."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    pattern = re.compile("(?i)" + "|".join([r"\bissue [0-9]+", "design " + "§", "anchor[ -](A[0-9]|§)", "reference " + "§",
                                   r"\.\./" + "shared", r"papers/[a-z0-9_-]+\.txt"]))
    hits = [f"{name}:{k + 1}" for name in sorted(os.listdir(here)) if name.endswith((".py", ".md"))
            for k, line in enumerate(open(os.path.join(here, name), encoding="utf-8")) if pattern.search(line)]
    assert hits == []


def test_readme_test_command_is_the_ci_command():
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    ci = open(os.path.join(os.path.dirname(__file__), ".ci", "run")).read().strip().splitlines()[-1]
    assert ci.startswith("python -m pytest") and ci in readme
    assert "rm -rf .venv" not in open(os.path.join(os.path.dirname(__file__), ".ci", "run")).read()


def test_weights_digest(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"abc" * 1000)
    assert train.file_digest(str(p)) == hashlib.sha256(b"abc" * 1000).hexdigest()
    p.write_bytes(b"abcd" * 1000)                          # size changes → recomputed
    assert train.file_digest(str(p)) == hashlib.sha256(b"abcd" * 1000).hexdigest()


def test_cache_key():
    base = dict(dataset="d1", weights="w1", preprocessing=drl.PREPROCESSING, precision="fp32", size=224)
    k = train.cache_key(**base)
    assert len(k) == 16 and k == train.cache_key(**dict(reversed(list(base.items()))))
    assert train.cache_key(**{**base, "precision": "bf16"}) != k
    assert train.cache_key(**{**base, "weights": "w2"}) != k
    assert train.cache_key(**{**base, "size": np.int64(224)}) == k


class _FirstStep(Exception):
    pass


@pytest.mark.fake_cuda
@pytest.mark.parametrize("script, argv, gpus, env, device", [
    ("train", ["--stage", "source"], 1, {}, "cuda:0"),
    ("train", ["--stage", "finetune", "--target", "synthetic-cells"], 1, {}, "cuda:0"),
    ("evaluate", ["--target", "synthetic-cells", "--n-train", "100", "--n-test", "100"], 1, {}, "cuda:0"),
    ("train", ["--stage", "source", "--seeds", "0", "1"], 2, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
     "cuda:1")],
    ids=["train source", "train finetune", "evaluate", "torchrun rank 1 of 2"])
def test_a_script_starts_on_a_machine_faked_to_have_gpus(script, argv, gpus, env, device, tmp_path, offline_hub,
                                                          fake_cuda, monkeypatch, capsys):
    """The default --device auto, through the start-up a user's command takes, on a machine that looks like it
    has `gpus` GPUs (only the C call that selects a device is faked, so torch.cuda.set_device's own check runs):
    the run reaches its first training step with the model and the batch on the right device, that device
    selected. Tensors are fake on "cuda"; a rank under torchrun reads its place from torchrun's variables."""
    monkeypatch.setattr(data, "SYNTHETIC_N", 200)
    out = ["--out", str(tmp_path / "r")] + TINY
    if "finetune" in argv:  # its source model, trained on the CPU beforehand
        assert run_script(train.main, ["--stage", "source", "--device", "cpu"] + out, capsys)[0] == 0
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append)

    def first_step(model, opt, batch, beta, grad_clip=1.0):
        raise _FirstStep({p.device for p in model.parameters()} | {b.device for b in
                                                                    (batch if isinstance(batch, tuple) else [batch])})
    monkeypatch.setattr(train, "train_step", first_step)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def real(fn):  # a module built under fake tensors cannot move to a device: models are built real, on the CPU
        def call(*a, **k):
            with unset_fake_temporarily():
                return fn(*a, **k)
        return call
    for module, name in ((train, "new_model"), (drl, "load_model"), (drl, "load_checkpoint")):
        monkeypatch.setattr(module, name, real(getattr(module, name)))
    with fake_cuda[0], pytest.raises(_FirstStep) as step:
        {"train": train, "evaluate": evaluate}[script].main(out + argv)
    assert step.value.args[0] == {torch.device(device)} and selected == [torch.device(device).index]
