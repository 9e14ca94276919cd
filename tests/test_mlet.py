"""MLET's factorised embedding: shapes, padding, initial scale, gradients to both factors, collapse to a plain
table with identical outputs (alone and inside SASRec)."""

import pytest
import torch

import largevocab as lv
from largevocab.integrations.sasrec import SASRec, SASRecConfig

# Tiny tensors: the shared fixture runs this module on one intra-op thread (see conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_and_weight_are_the_product():
    torch.manual_seed(0)
    emb = lv.FactorizedEmbedding(50, 8, 32, padding_idx=0)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert emb.weight.shape == (50, 8)
    torch.testing.assert_close(emb(ids), (emb.A @ emb.B)[ids])
    torch.testing.assert_close(emb(ids), torch.nn.functional.embedding(ids, emb.weight))
    assert torch.equal(emb.weight[0], torch.zeros(8))


def test_padding_row_gets_no_gradient_and_both_factors_train():
    torch.manual_seed(0)
    emb = lv.FactorizedEmbedding(20, 4, 16, padding_idx=0)
    ids = torch.tensor([0, 0, 5, 9])
    (emb(ids) ** 2).sum().backward()
    assert torch.equal(emb.A.grad[0], torch.zeros(16))
    assert emb.A.grad[5].abs().sum() > 0 and emb.B.grad.abs().sum() > 0
    emb.zero_grad()
    (emb.weight[1:] ** 2).sum().backward()  # the tied-output path: gradients through the product
    assert emb.A.grad[3].abs().sum() > 0 and emb.B.grad.abs().sum() > 0


@pytest.mark.parametrize("inner", [16, 64, 256])
def test_initial_product_has_the_requested_scale(inner):
    torch.manual_seed(0)
    std = 0.05
    emb = lv.FactorizedEmbedding(4000, 16, inner, std=std)
    measured = emb.weight.detach().std().item()
    assert abs(measured / std - 1) < 0.1, (inner, measured)


def test_collapse_gives_a_plain_embedding_with_identical_outputs():
    torch.manual_seed(0)
    emb = lv.FactorizedEmbedding(30, 6, 24, padding_idx=2)
    with torch.no_grad():
        emb.A.add_(0.1 * torch.randn_like(emb.A))  # as if trained (padding row stays what it is)
        emb.A[2].zero_()
    ids = torch.randint(0, 30, (4, 5))
    plain = emb.collapse()
    assert type(plain) is torch.nn.Embedding and plain.padding_idx == 2
    assert plain.weight.shape == (30, 6) and plain.weight.requires_grad
    torch.testing.assert_close(plain(ids), emb(ids), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain.weight, emb.weight.detach())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="inner_dim must be >= embedding_dim"):
        lv.FactorizedEmbedding(10, 8, 4)
    with pytest.raises(TypeError, match="num_embeddings must be an int"):
        lv.FactorizedEmbedding(10.0, 8, 8)
    with pytest.raises(ValueError, match="padding_idx"):
        lv.FactorizedEmbedding(10, 8, 8, padding_idx=10)
    with pytest.raises(ValueError, match="std"):
        lv.FactorizedEmbedding(10, 8, 8, std=0.0)


def test_sasrec_mlet_collapse_gives_the_same_scores():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=40, hidden_dim=8, max_len=6, mlet_inner_dim=32, dropout=0.0))
    with torch.no_grad():
        model.item_emb.A.add_(0.05 * torch.randn_like(model.item_emb.A))
        model.item_emb.A[0].zero_()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9], [4, 5, 6, 7, 8, 39]])
    model.eval()
    before = model.user_embeddings(seq) @ model.item_weight().T
    model.collapse_mlet()
    assert isinstance(model.item_emb, torch.nn.Embedding) and model.config.mlet_inner_dim is None
    after = model.user_embeddings(seq) @ model.item_weight().T
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after[:, 1:].topk(10).indices, before[:, 1:].topk(10).indices)


def test_sasrec_mlet_initial_table_matches_the_plain_tables_scale():
    torch.manual_seed(0)
    plain = SASRec(SASRecConfig(num_items=3000, hidden_dim=32))
    mlet = SASRec(SASRecConfig(num_items=3000, hidden_dim=32, mlet_inner_dim=128))
    ratio = mlet.item_weight()[1:].std().item() / plain.item_weight()[1:].std().item()
    assert abs(ratio - 1) < 0.1
