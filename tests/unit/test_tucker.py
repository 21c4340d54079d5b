"""flora.tucker against einsum and against exact low-rank constructions."""

from __future__ import annotations

import pytest
import torch

from flora.tucker import fold_linear, hosvd, mode_product, reconstruct, unfold


def test_mode_product_matches_einsum():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    u = torch.randn(7, 4)
    torch.testing.assert_close(mode_product(x, u, 1), torch.einsum("abc,jb->ajc", x, u))
    u0 = torch.randn(2, 3)
    torch.testing.assert_close(mode_product(x, u0, 0), torch.einsum("abc,ja->jbc", x, u0))
    with pytest.raises(ValueError, match="mode 2"):
        mode_product(x, u, 2)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2), (3, 2, 2, 3), (2, 2, 1, 3, 2)])
def test_reconstruct_matches_einsum(shape):
    torch.manual_seed(0)
    core = torch.randn(shape)
    factors = [torch.randn(d + 3, r) for d, r in zip(range(len(shape)), shape, strict=True)]
    letters = "abcde"[: len(shape)]
    spec = letters + "," + ",".join(L.upper() + L for L in letters) + "->" + letters.upper()
    want = 0.5 * torch.einsum(spec, core, *factors)
    torch.testing.assert_close(reconstruct(core, factors, 0.5), want, rtol=1e-5, atol=1e-5)


def test_unfold_is_mode_major():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert unfold(x, 1).shape == (3, 8)
    assert torch.equal(unfold(x, 1)[2], x[:, 2, :].reshape(-1))


def test_hosvd_recovers_exactly_low_rank_tensor():
    torch.manual_seed(0)
    ranks = (3, 2, 2, 2)
    core = torch.randn(ranks)
    factors = [torch.randn(d, r) for d, r in zip((10, 8, 3, 3), ranks, strict=True)]
    full = reconstruct(core, factors)
    g, us = hosvd(full, ranks)
    assert g.shape == ranks and [u.shape for u in us] == [(10, 3), (8, 2), (3, 2), (3, 2)]
    assert float((reconstruct(g, us) - full).norm() / full.norm()) < 1e-5
    for u in us:  # orthonormal columns
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
    # one rank short loses real energy
    g1, us1 = hosvd(full, (2, 2, 2, 2))
    assert float((reconstruct(g1, us1) - full).norm() / full.norm()) > 1e-2


def test_hosvd_rank_bounds():
    with pytest.raises(ValueError, match="rank 5 of mode 1"):
        hosvd(torch.randn(4, 4), (2, 5))
    # rank up to the mode size even when the unfolding has fewer columns
    t = torch.randn(6, 2)
    g, us = hosvd(t, (6, 2))
    assert us[0].shape == (6, 6)
    torch.testing.assert_close(reconstruct(g, us), t, rtol=1e-5, atol=1e-5)


def test_fold_linear_reproduces_delta():
    torch.manual_seed(0)
    core = torch.randn(3, 4)
    u_out, u_in = torch.randn(10, 3), torch.randn(7, 4)
    lora_a, lora_b = fold_linear(core, [u_out, u_in], 2.0)
    assert lora_a.shape == (4, 7) and lora_b.shape == (10, 4)
    want = 2.0 * torch.einsum("ab,ia,jb->ij", core, u_out, u_in)
    torch.testing.assert_close(lora_b @ lora_a, want, rtol=1e-5, atol=1e-5)
