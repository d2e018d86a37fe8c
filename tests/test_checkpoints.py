"""Checkpoints: torch.save/torch.load(weights_only=True), DCP, torch.optim <-> gradcent."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import gradcent
from gradcent import centralize

OPTS = {
    "SGD": (gradcent.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    "Adam": (gradcent.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-2}),
    "AdamW": (gradcent.AdamW, torch.optim.AdamW, {"lr": 0.01}),
    "Adagrad": (gradcent.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 1e-2}),
}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g))
        for _ in range(n)
    ]


def _train(model, opt, batches, centre_by_hand=False):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y.double()).backward()
        if centre_by_hand:  # a plain torch optimizer given centred gradients by hand
            for p in model.parameters():
                if p.dim() == 2:
                    p.grad = centralize(p.grad)
        opt.step()


def _assert_same(m1, m2):
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", OPTS)
def test_torch_save_load_weights_only_resumes_identically(name, tmp_path):
    cls, _, kw = OPTS[name]
    data = _batches(4)
    straight = _net()
    _train(straight, cls(straight.parameters(), model=straight, gc="conv", **kw), data)

    model = _net()
    opt = cls(model.parameters(), model=model, gc="conv", **kw)
    opt.param_groups[0]["gc"] = "all"  # per-group setting, must survive the round trip
    _train(model, opt, data[:2])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["opt"]["param_groups"][0]["gc"] == "all"

    resumed = _net()
    resumed.load_state_dict(ck["model"])
    opt2 = cls(resumed.parameters(), model=resumed, gc="conv", **kw)
    opt2.load_state_dict(ck["opt"])
    assert opt2.param_groups[0]["gc"] == "all"
    _train(resumed, opt2, data[2:])
    straight_all = _net()
    opt_all = cls(straight_all.parameters(), model=straight_all, gc="all", **kw)
    _train(straight_all, opt_all, data)
    _assert_same(resumed, straight_all)
    # gc="conv" on an MLP centralizes nothing: the modes really differ here
    assert not torch.allclose(straight[0].weight, straight_all[0].weight)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_single_process_save_and_load(tmp_path):
    data = _batches(4)
    ref = _net()
    _train(ref, gradcent.Adam(ref.parameters(), lr=0.01, weight_decay=1e-2, model=ref), data)

    model = _net()
    opt = gradcent.Adam(model.parameters(), lr=0.01, weight_decay=1e-2, model=model)
    _train(model, opt, data[:2])
    msd, osd = get_state_dict(model, opt)
    # no init_process_group: DCP runs without a process group in one process
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"))

    resumed = _net()
    opt2 = gradcent.Adam(resumed.parameters(), lr=0.01, weight_decay=1e-2, model=resumed)
    msd2, osd2 = get_state_dict(resumed, opt2)
    target = {"model": msd2, "optim": osd2}
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"))
    set_state_dict(
        resumed, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"]
    )
    assert not torch.distributed.is_initialized()
    assert opt2.param_groups[0]["gc"] == "all"
    assert opt2.param_groups[0]["weight_decay"] == 1e-2
    _train(resumed, opt2, data[2:])
    _assert_same(resumed, ref)


@pytest.mark.parametrize("name", OPTS)
def test_plain_torch_state_into_gradcent_and_back(name):
    cls, torch_cls, kw = OPTS[name]
    # no decay here: "centred by hand" means P(g), which is GC's rule only at λ = 0
    # (with coupled decay GC uses P(g + λw); resuming with decay is tested above)
    kw = {k: v for k, v in kw.items() if k != "weight_decay"}
    data = _batches(6)
    # reference: torch optimizer throughout, gradients centred by hand
    ref = _net()
    _train(ref, torch_cls(ref.parameters(), **kw), data, centre_by_hand=True)

    model = _net()
    plain = torch_cls(model.parameters(), **kw)
    _train(model, plain, data[:2], centre_by_hand=True)
    gc_opt = cls(model.parameters(), model=model, **kw)
    gc_opt.load_state_dict(plain.state_dict())  # no "gc" key: keeps gc="all"
    assert gc_opt.param_groups[0]["gc"] == "all"
    _train(model, gc_opt, data[2:4])
    back = torch_cls(model.parameters(), **kw)
    back.load_state_dict(gc_opt.state_dict())  # torch keeps the extra "gc" key, unused
    _train(model, back, data[4:], centre_by_hand=True)
    _assert_same(model, ref)
    # and the by-hand centring matters: without it the runs differ
    raw = _net()
    _train(raw, torch_cls(raw.parameters(), **kw), data)
    assert not torch.allclose(raw[0].weight, ref[0].weight)


@pytest.mark.parametrize("name", OPTS)
def test_gc_none_state_dict_is_torch_state_dict(name):
    cls, torch_cls, kw = OPTS[name]
    data = _batches(2)
    a, b = _net(), _net()
    opt_a = cls(a.parameters(), gc=None, **kw)
    opt_b = torch_cls(b.parameters(), **kw)
    _train(a, opt_a, data)
    _train(b, opt_b, data)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"][0].pop("gc") is None
    assert sa["param_groups"] == sb["param_groups"]
    for k in sb["state"]:
        for n, v in sb["state"][k].items():
            assert torch.equal(sa["state"][k][n], v), n
