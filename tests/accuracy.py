"""The accuracy rule of every test, CPU and GPU (CONVENTIONS.md, "Numerics").

A result passes when its largest error against the float64 reference is at most twice the
largest error of the naive computation done in the input dtype
(``reference.attention_forward(..., upcast=False)``), plus a small floor:

    max|got - ref64| <= 2 * max|naive - ref64| + floor

Positions where the reference is ``-inf`` (the lse of a fully masked row) must be ``-inf``
in ``got`` too, and ``got`` must be finite everywhere else.

Usage: ``from accuracy import assert_close`` (pytest puts ``tests/`` on ``sys.path``).
"""
import ml_dtypes
import numpy as np

# The floor, relative to the reference's magnitude max(1, max|ref64|). It only matters
# where the naive error is accidentally ~0 while a correct kernel still carries a little
# summation-order noise. The worst such case is seqlen_k == 1: the naive dS is exactly 0,
# a kernel's dS = P * (dP - delta) is the float32 difference of two dot products summed in
# different orders (~eps32 * sqrt(headdim)), and dK sums it over up to ~1000 rows.
# - float16 / bfloat16: one unit in the last place at 1.0. That covers the float32 noise
#   and is far below any real bug (a wrong mask or a missing rescale moves results O(0.1)).
# - float32: 2^-16 ~ 1.5e-5 covers the noise above, yet is 30x below the error of silent
#   TF32 (10-bit mantissa), which CONVENTIONS.md forbids.
# - float64: the naive computation *is* the reference (error 0), so the floor alone bounds
#   the error; 1e-12 leaves room for a tiled algorithm's reordered sums and nothing else.
# A result stored coarser than its inputs (the float32 lse of float64 inputs) gets the
# floor of its own dtype: it cannot be more exact than that.
FLOORS = {
    np.dtype(np.float16): 2.0 ** -10,
    np.dtype(ml_dtypes.bfloat16): 2.0 ** -7,
    np.dtype(np.float32): 2.0 ** -16,
    np.dtype(np.float64): 1e-12,
}


def _host64(x):
    x = x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x
    return np.asarray(x).astype(np.float64)


def assert_close(name, got, ref64, naive, floor=None):
    """Assert the accuracy rule for one array.

    Parameters
    ----------
    name : str
        Named in the assertion message (e.g. ``"dq"``).
    got : NumPy or CuPy array
        The result under test, any float dtype.
    ref64 : array
        The float64 reference (``upcast=True``), same shape.
    naive : array
        The reference computed in the input dtype (``upcast=False``).
    floor : float, optional
        Absolute floor; default ``max(FLOORS[naive.dtype], FLOORS[got.dtype])`` times
        ``max(1, max|ref64|)``.
    """
    g, r, n = _host64(got), _host64(ref64), _host64(naive)
    assert g.shape == r.shape == n.shape, f"{name}: shapes {g.shape}, {r.shape}, {n.shape}"
    masked = np.isneginf(r)
    wrong_inf = np.isneginf(g) != masked
    assert not wrong_inf.any(), (
        f"{name}: -inf must be exactly where the reference has it; {wrong_inf.sum()} "
        f"positions differ, first at {np.argwhere(wrong_inf)[0].tolist()}")
    g, r, n = g[~masked], r[~masked], n[~masked]
    if not r.size:
        return
    nonfinite = ~np.isfinite(g)
    assert not nonfinite.any(), (
        f"{name}: {nonfinite.sum()} NaN/inf values where the reference is finite")
    if floor is None:
        relative = max(FLOORS[np.dtype(naive.dtype)], FLOORS[np.dtype(got.dtype)])
        floor = relative * max(1.0, np.abs(r).max())
    err = np.abs(g - r).max()
    naive_err = np.abs(n - r).max()
    bound = 2 * naive_err + floor
    assert err <= bound, (
        f"{name}: max abs error {err:.3g} vs the float64 reference exceeds "
        f"2 * naive error {naive_err:.3g} + floor {floor:.3g} = {bound:.3g}")
