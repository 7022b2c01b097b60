import torch

from spd_mcp.model.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid


def test_lower_leaky_forward_is_clamp():
    z = torch.tensor([-2.0, 0.0, 0.3, 1.0, 4.0])
    assert torch.equal(lower_leaky_hard_sigmoid(z), z.clamp(0, 1))


def test_dead_unit_receives_reviving_gradient():
    # CI is exactly 0 for z < 0, yet a loss that wants CI larger still moves z upward.
    z = torch.tensor([-0.5], requires_grad=True)
    g = lower_leaky_hard_sigmoid(z, alpha=0.1)
    assert g.item() == 0.0
    (-(g.sum())).backward()  # minimising -g wants g (hence z) to grow
    assert z.grad is not None and z.grad.item() < 0  # descent step z -= lr*grad increases z
    assert torch.isclose(z.grad, torch.tensor([-0.1])).all()


def test_dead_unit_not_pushed_further_down():
    z = torch.tensor([-0.5], requires_grad=True)
    lower_leaky_hard_sigmoid(z, alpha=0.1).sum().backward()  # wants g smaller: no leak
    assert z.grad.item() == 0.0


def test_upper_leaky_values_and_slope():
    z = torch.tensor([-1.0, 0.5, 3.0], requires_grad=True)
    g = upper_leaky_hard_sigmoid(z, alpha=0.01)
    assert torch.allclose(g, torch.tensor([0.0, 0.5, 1.02]))
    g.sum().backward()
    assert torch.allclose(z.grad, torch.tensor([0.0, 1.0, 0.01]))
