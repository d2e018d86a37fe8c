"""The GC operator on tensors: exact values, properties, layouts, precisions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradcent import centralize, centralize_, centralize_many_, unit_size

# ---------------------------------------------------------------- exact tables


@pytest.mark.parametrize(
    ("values", "dims", "groups", "expected"),
    [
        # 1-D (a bias): no reduction dim, untouched.
        ([1.0, 2.0, 3.0], None, 1, [1.0, 2.0, 3.0]),
        # 2-D (Linear): each row loses its mean.
        ([[1.0, 2.0], [3.0, 4.0]], None, 1, [[-0.5, 0.5], [-0.5, 0.5]]),
        ([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], None, 1, [[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]]),
        # 3-D (Conv1d, (out, in, k)): the mean over in and k.
        (
            [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]],
            None,
            1,
            [[[-1.5, -0.5], [0.5, 1.5]], [[-2.0, -2.0], [-2.0, 6.0]]],
        ),
        # 4-D (Conv2d, (out, in, kh, kw)).
        (
            [[[[1.0, 3.0], [5.0, 7.0]]], [[[2.0, 2.0], [2.0, 2.0]]]],
            None,
            1,
            [[[[-3.0, -1.0], [1.0, 3.0]]], [[[0.0, 0.0], [0.0, 0.0]]]],
        ),
        # Explicit dims: columns instead of rows (a Flax/Keras (in, out) kernel).
        ([[1.0, 2.0], [3.0, 6.0]], (0,), 1, [[-1.0, -2.0], [1.0, 2.0]]),
        # Grouped ConvTranspose2d(4, 4, 1, groups=2): weight (in=4, out/g=2, 1, 1),
        # output channel (g, j) spans rows of group g in column j.
        (
            [[[[0.0]], [[10.0]]], [[[2.0]], [[20.0]]], [[[4.0]], [[40.0]]], [[[8.0]], [[80.0]]]],
            (0, 2, 3),
            2,
            [[[[-1.0]], [[-5.0]]], [[[1.0]], [[5.0]]], [[[-2.0]], [[-20.0]]], [[[2.0]], [[20.0]]]],
        ),
        # The same tensor without groups: column j spans all four rows.
        (
            [[[[0.0]], [[10.0]]], [[[2.0]], [[20.0]]], [[[4.0]], [[40.0]]], [[[8.0]], [[80.0]]]],
            (0, 2, 3),
            1,
            [
                [[[-3.5]], [[-27.5]]],
                [[[-1.5]], [[-17.5]]],
                [[[0.5]], [[2.5]]],
                [[[4.5]], [[42.5]]],
            ],
        ),
    ],
)
def test_exact_values(values, dims, groups, expected):
    t = torch.tensor(values)
    before = t.clone()
    out = centralize(t, dims, groups)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=0)
    assert torch.equal(t, before)  # the out-of-place form leaves its input alone
    assert centralize_(t, dims, groups) is t
    torch.testing.assert_close(t, torch.tensor(expected), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shape", "dims", "groups", "m"),
    [
        ((5,), None, 1, 1),
        ((5, 3), None, 1, 3),
        ((8, 4, 3, 3), None, 1, 36),
        ((8, 4, 3, 3), (0, 2, 3), 2, 36),
        ((6, 2, 3), (0, 2), 3, 6),
        ((1, 7), None, 1, 7),
        ((7, 1), None, 1, 1),
    ],
)
def test_unit_size(shape, dims, groups, m):
    assert unit_size(shape, dims, groups) == m


def test_single_input_units_are_left_alone():
    # M = 1: the centred gradient would be 0 and the unit would never train.
    g = torch.tensor([[3.0], [-2.0]])
    assert torch.equal(centralize(g), g)
    dw = torch.randn(6, 1, 1, 1)  # depthwise 1x1 conv
    assert torch.equal(centralize(dw), dw)


def test_zero_size_and_scalar_tensors():
    for t in (torch.empty(0, 3), torch.empty(4, 0), torch.empty(0), torch.tensor(2.0)):
        assert torch.equal(centralize(t), t)


# ---------------------------------------------------------------- properties

shapes = st.lists(st.integers(1, 5), min_size=2, max_size=4)


def _tensor(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1


@given(shapes, st.integers(0, 2**16))
def test_per_unit_means_are_zero(shape, seed):
    g = _tensor(shape, seed)
    out = centralize(g)
    dims = tuple(range(1, g.dim()))
    if unit_size(shape) > 1:
        assert out.mean(dim=dims).abs().max() <= 1e-12 * (1 + g.abs().max())
    else:
        assert torch.equal(out, g)


@given(shapes, st.integers(0, 2**16))
def test_idempotent(shape, seed):
    once = centralize(_tensor(shape, seed))
    torch.testing.assert_close(centralize(once), once, rtol=0, atol=1e-12)


@given(shapes, st.integers(0, 2**16))
def test_projection_never_grows_the_norm(shape, seed):
    g = _tensor(shape, seed)
    assert centralize(g).norm() <= g.norm() * (1 + 1e-12)


@given(shapes, st.integers(0, 2**16), st.floats(-1e3, 1e3, allow_nan=False))
def test_commutes_with_scaling(shape, seed, a):
    g = _tensor(shape, seed)
    torch.testing.assert_close(centralize(a * g), a * centralize(g), rtol=1e-10, atol=1e-9)


@given(shapes, st.integers(0, 2**16))
def test_symmetric(shape, seed):
    # P = Pᵀ: <P a, b> = <a, P b>.
    a, b = _tensor(shape, seed), _tensor(shape, seed + 1)
    lhs = (centralize(a) * b).sum()
    rhs = (a * centralize(b)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-9)


@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 999)
)
def test_grouped_units_match_a_per_group_loop(groups, in_per_group, out_per_group, k, seed):
    # ConvTranspose weight (in, out/g, k, k): each (group, output column) is one unit.
    w = _tensor((groups * in_per_group, out_per_group, k, k), seed)
    out = centralize(w, (0, 2, 3), groups)
    expected = w.clone()
    for gi in range(groups):
        rows = slice(gi * in_per_group, (gi + 1) * in_per_group)
        for j in range(out_per_group):
            unit = expected[rows, j]
            if unit.numel() > 1:
                unit -= unit.mean()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- layouts


def test_non_contiguous_in_place():
    base = torch.randn(5, 4, dtype=torch.float64)
    t = base.t()  # (4, 5), not contiguous
    assert not t.is_contiguous()
    expected = centralize(t.contiguous())
    centralize_(t)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(base, expected.t(), rtol=0, atol=1e-15)  # wrote through


def test_sliced_view_writes_only_its_slice():
    base = torch.randn(6, 4, dtype=torch.float64)
    before = base.clone()
    centralize_(base[::2])
    torch.testing.assert_close(base[::2], centralize(before[::2]), rtol=0, atol=1e-15)
    assert torch.equal(base[1::2], before[1::2])


def test_channels_last():
    t = torch.randn(6, 3, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    expected = centralize(t.contiguous())
    out = centralize(t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    centralize_(t)
    assert t.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_grouped_on_non_contiguous_tensor():
    base = torch.randn(2, 6, 3, dtype=torch.float64)
    t = base.transpose(0, 1)  # (6, 2, 3), dim 0 split into 3 groups
    expected = centralize(t.contiguous(), (0, 2), 3)
    centralize_(t, (0, 2), 3)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    # Rows of 4096 values near 1: a mean accumulated in fp16/bf16 would be off by
    # far more than one rounding of the output.
    g = (1 + 0.01 * torch.randn(4, 4096, dtype=torch.float64)).to(dtype)
    exact = centralize(g.double())
    out = centralize(g)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    # Each element is x - mean rounded once: error at most half an ulp of the result
    # plus the fp32 mean's error, tiny next to it.
    err = (out.double() - exact).abs()
    assert (err <= exact.abs() * eps + 1e-6).all()
    assert out.double().mean(dim=1).abs().max() < 1e-3 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_place_keeps_dtype_and_layout(dtype):
    g = torch.randn(8, 3, 3, 3).to(dtype).to(memory_format=torch.channels_last)
    ref = centralize(g.double()).to(dtype)
    centralize_(g)
    assert g.dtype == dtype and g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g, ref, rtol=torch.finfo(dtype).eps, atol=1e-3)


# ---------------------------------------------------------------- many tensors


def _mixed_tensors():
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randn(8, 3, 3, 3, generator=gen),  # four same-shaped: the stacked path
        torch.randn(8, 3, 3, 3, generator=gen),
        torch.randn(8, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(3, 8, 3, 3, generator=gen).transpose(0, 1),  # non-contiguous
        torch.randn(300, 256, generator=gen),  # above the stacking size
        torch.randn(300, 256, generator=gen),
        torch.randn(7, generator=gen),  # 1-D: untouched
        torch.randn(5, 1, generator=gen),  # M = 1: untouched
        torch.randn(0, 4, generator=gen),  # empty
        torch.randn(4, 5, generator=gen, dtype=torch.float64),
        torch.randn(4, 5, generator=gen).to(torch.bfloat16),
        torch.randn(4, 5, generator=gen).to(torch.bfloat16),
    ]


def test_many_equals_per_tensor():
    ts = _mixed_tensors()
    many = [t.clone() for t in ts]
    centralize_many_(many)
    for got, t in zip(many, ts, strict=True):
        assert torch.equal(got, centralize(t))


def test_many_with_per_tensor_dims_and_groups():
    ts = [torch.randn(6, 2, 3), torch.randn(6, 2, 3), torch.randn(4, 5), torch.randn(4, 5)]
    dims = [(0, 2), (0, 2), None, (0,)]
    groups = [3, 1, 1, 1]
    many = [t.clone() for t in ts]
    centralize_many_(many, dims, groups)
    for got, t, d, g in zip(many, ts, dims, groups, strict=True):
        assert torch.equal(got, centralize(t, d, g))


def test_many_with_one_dims_for_all():
    ts = [torch.randn(3, 4) for _ in range(3)]
    many = [t.clone() for t in ts]
    centralize_many_(many, (0,))
    for got, t in zip(many, ts, strict=True):
        assert torch.equal(got, centralize(t, (0,)))


def test_many_stacked_path_writes_through_views():
    base = torch.randn(4, 6, 5)
    views = list(base.unbind(1))  # six (4, 5) views with stride, same shape: stacked
    expected = [centralize(v) for v in views]
    centralize_many_(views)
    for i, e in enumerate(expected):
        assert torch.equal(base[:, i], e)


def test_many_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 tensors but 3 dims"):
        centralize_many_([torch.randn(2, 2), torch.randn(2, 2)], [None, None, None])
    with pytest.raises(ValueError, match="1 groups"):
        centralize_many_([torch.randn(2, 2), torch.randn(2, 2)], None, [1])


@pytest.fixture
def two_threads():
    # Splitting a long unit between threads is what broke bit-for-bit equality.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "shape", [(1, 32768), (1, 32769), (1, 40000), (1, 65536), (2, 32768), (1, 2, 20000)]
)
def test_many_is_bit_for_bit_per_tensor_for_long_units(shape, two_threads):
    # Issue 11.13: one row of 32,769-65,536 elements differed by ~1e-8 when stacked.
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(shape, generator=gen) for _ in range(3)]
    one = [centralize_(t.clone()) for t in ts]
    many = [t.clone() for t in ts]
    centralize_many_(many)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)
