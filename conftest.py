"""Shared fixtures: no network, the scripts run as a user runs them, and fake CUDA."""
import collections
import urllib.error

import numpy as np
import pytest
import torch

import train

torch.set_num_threads(1)  # the models under test are tiny: one thread avoids OpenMP spin on a busy CPU


def run_script(main, argv, capsys):
    """Run a script's main() the way `python script.py ...` does: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No DINO weights anywhere: an empty TORCH_HOME and a download that fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("DRL_DINO_WEIGHTS", raising=False)

    def no_network(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


TINY = ["--steps", "3", "--seeds", "0", "--betas", "1", "--batch-size", "4", "--latent-dim", "4"]


aten = torch.ops.aten


READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.equal.default}


class DeviceTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Per step (set by the caller; "setup" before the first): host->device and device->host copies as
    (kind, non_blocking) and reads of device values by op name."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self):
        self.step, self.copies, self.reads = "setup", collections.defaultdict(list), collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and torch.is_tensor(args[0]) else None
        if func is aten._to_copy.default and src is not None and "device" in kwargs \
                and torch.device(kwargs["device"]).type != src.device.type:
            self.copies[self.step].append((f"{src.device.type}->{torch.device(kwargs['device']).type}",
                                           bool(kwargs.get("non_blocking"))))
        elif func is aten.copy_.default and args[0].device.type != args[1].device.type and args[1].dim() > 0:
            self.copies[self.step].append((f"{args[1].device.type}->{args[0].device.type}", bool(args[2:3] and args[2])))
        elif func in READS and any(torch.is_tensor(a) and a.device.type == "cuda" for a in args):
            self.reads[self.step].append(str(func))
        return func(*args, **kwargs)


def _fake_backward(loss, *args, **kwargs):
    todo, seen = [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)
        if leaf is not None and leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        todo.extend(f for f, _ in fn.next_functions)


def _pin(tensor, *args, **kwargs):  # pinning needs the CUDA host allocator: the identity, for CPU tensors only
    if tensor.device.type != "cpu":
        raise RuntimeError(f"cannot pin a {tensor.device.type} tensor: only CPU tensors can be pinned")
    return tensor


class _FakeEvent:  # a CUDA event needs a real device: the harness sees the copies, not the waits on them
    def record(self, *a):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """(FakeTensorMode, DeviceTraffic): enter both (`with mode, traffic:`) to run code on a fake "cuda". Each
    training step is marked where its seed is drawn (train.step_seed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch.Tensor, "backward", _fake_backward)
    monkeypatch.setattr(torch.Tensor, "pin_memory", _pin)
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(torch.Generator() for _ in range(8)))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    # fake tensors never touch a device, also where a test fakes torch.cuda.is_available() (which FakeTensorMode reads)
    monkeypatch.setattr(FakeTensorMode, "avoid_device_init", property(lambda self: True))
    real_numpy = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: np.zeros(self.shape, dtype=np.float32)
                        if type(self).__name__ == "FakeTensor" else real_numpy(self, *a, **k))
    traffic, step_seed = DeviceTraffic(), train.step_seed

    def marked(seed, step):
        traffic.step = step
        return step_seed(seed, step)
    monkeypatch.setattr(train, "step_seed", marked)
    return FakeTensorMode(allow_non_fake_inputs=True), traffic
