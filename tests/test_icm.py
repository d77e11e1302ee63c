import pytest
import torch

from retrv_r1_plugin.icm import ICMConfig, InformationCompressionModule


def make(share: bool = True, hidden: int = 48) -> InformationCompressionModule:
    torch.manual_seed(0)
    return InformationCompressionModule(ICMConfig(hidden_size=hidden, dim=32, num_heads=4, share_compressor=share, output_scale=0.5))


def test_shapes_width_equals_lm_hidden_size():
    icm = make()
    cand = torch.randn(5, 7, 48)
    query = torch.randn(1, 3, 48)
    t_con, t_rel = icm(cand, query)
    assert t_con.shape == (5, 48) and t_rel.shape == (5, 48)
    # outputs are scaled to the LM embedding RMS given as output_scale
    assert torch.allclose(t_con.pow(2).mean(-1).sqrt(), torch.full((5,), 0.5), atol=1e-3)


def test_content_token_is_query_independent_and_relation_is_not():
    icm = make()
    cand = torch.randn(2, 6, 48)
    q1, q2 = torch.randn(1, 4, 48), torch.randn(1, 4, 48)
    c1, r1 = icm(cand, q1)
    c2, r2 = icm(cand, q2)
    assert torch.equal(c1, c2)
    assert not torch.allclose(r1, r2)


def test_padding_mask_makes_padding_irrelevant():
    icm = make()
    cand = torch.randn(1, 4, 48)
    padded = torch.cat([cand, torch.randn(1, 3, 48) * 100], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    q = torch.randn(1, 2, 48)
    assert torch.allclose(icm.content(cand), icm.content(padded, mask), atol=1e-5)
    assert torch.allclose(icm.relation(cand, q), icm.relation(padded, q, mask), atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_gradients_reach_every_parameter(share):
    icm = make(share)
    cand = torch.randn(3, 5, 48, requires_grad=True)
    query = torch.randn(1, 4, 48, requires_grad=True)
    t_con, t_rel = icm(cand, query)
    (t_con.square().sum() + (t_rel * torch.randn_like(t_rel)).sum()).backward()
    for name, p in icm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0 and cand.grad.abs().sum() > 0


def test_sharing_is_configurable():
    shared, separate = make(True), make(False)
    assert shared.compress_relation is shared.compress
    assert separate.compress_relation is not separate.compress
    n_shared = sum(p.numel() for p in shared.parameters())
    n_sep = sum(p.numel() for p in separate.parameters())
    assert n_sep > n_shared


def test_inner_dim_must_divide_heads():
    with pytest.raises(ValueError, match="divisible"):
        InformationCompressionModule(ICMConfig(hidden_size=48, dim=30, num_heads=4))
