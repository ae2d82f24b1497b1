"""The loss on data the test makes: perfect logits score low, weights steer it, gradients flow."""

import torch
import torch.nn.functional as F

from raysegment.model.losses import LossConfig, segmentation_loss, soft_dice_per_class


def _target():
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 2:6, 2:6], y[:, 8:12, 8:12], y[:, 10:14, 2:5] = 1, 2, 3
    return y


def test_perfect_logits_give_dice_one_and_near_zero_loss():
    y = _target()
    logits = F.one_hot(y, 4).permute(0, 3, 1, 2).float() * 20
    torch.testing.assert_close(soft_dice_per_class(logits, y), torch.ones(3), atol=1e-4, rtol=0)
    assert float(segmentation_loss(logits, y, LossConfig())) < 1e-3
    wrong = F.one_hot((y + 1) % 4, 4).permute(0, 3, 1, 2).float() * 20
    assert float(soft_dice_per_class(wrong, y).max()) < 1e-3
    assert float(segmentation_loss(wrong, y, LossConfig())) > 10


def test_terms_and_class_weights_steer_the_loss():
    y = _target()
    logits = F.one_hot(y, 4).permute(0, 3, 1, 2).float() * 5
    logits[:, :, 2:6, 2:6] = 0  # RV region uncertain
    ce_only = float(segmentation_loss(logits, y, LossConfig(dice_weight=0.0)))
    dice_only = float(segmentation_loss(logits, y, LossConfig(ce_weight=0.0)))
    both = float(segmentation_loss(logits, y, LossConfig()))
    assert abs(both - (ce_only + dice_only)) < 1e-5
    rv_heavy = float(segmentation_loss(logits, y, LossConfig(ce_weight=0.0, class_weights=(4.0, 1.0, 1.0))))
    assert rv_heavy > dice_only  # the uncertain class counts more


def test_gradients_push_towards_the_target():
    y = _target()
    logits = torch.zeros(2, 4, 16, 16, requires_grad=True)
    segmentation_loss(logits, y, LossConfig()).backward()
    g = logits.grad
    assert bool((g.gather(1, y[:, None]) < 0).all())  # raising the true class's logit lowers the loss


def test_deep_supervision_weighs_coarser_levels_half_each():
    from raysegment.model.losses import deep_supervision_loss

    y = _target()
    config = LossConfig()
    perfect = [F.one_hot(y[:, ::s, ::s], 4).permute(0, 3, 1, 2).float() * 20 for s in (1, 2, 4)]
    wrong = F.one_hot((y[:, ::2, ::2] + 1) % 4, 4).permute(0, 3, 1, 2).float() * 20
    assert float(deep_supervision_loss(perfect, y, config)) < 1e-3  # each level against y every s-th pixel
    torch.testing.assert_close(deep_supervision_loss(perfect[:1], y, config), segmentation_loss(perfect[0], y, config))
    mixed = deep_supervision_loss([perfect[0], wrong], y, config)
    torch.testing.assert_close(mixed, (segmentation_loss(perfect[0], y, config)
                                       + 0.5 * segmentation_loss(wrong, y[:, ::2, ::2], config)) / 1.5)
