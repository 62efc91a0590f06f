"""A hand-checkable merge for defence tests, with a NON-ZERO base tower.

The "tower" is one linear map from a 3×2×2 image (12 pixels) to 2 features; the classifier
compares the normalised features with the unit vectors (class 0: feature 0, class 1: feature 1)
at logit scale 4, with no pixel normalisation (mean 0, std 1). Pixel 0 carries class 0, pixel 1
class 1, pixel 3 is always on (a bias). The base already reads the signals weakly and has small
weights everywhere; the (single) expert adds the clean update and the backdoor: pixel 2, the
trigger, wired to class 0 with weight 3. Clean images never light the trigger.

Everything a test needs to recompute a defence step independently is here: the weights
``θ_0 + m ⊙ Δ``, and the logits of :func:`logits` as plain tensor code.
"""

import torch
import torch.nn.functional as F

from safemerge.merging import MergedEncoder, TaskArithmetic
from safemerge.merging.learner import MergeLearner
from safemerge.models import ImageClassifier

SIGNAL_0, SIGNAL_1, TRIGGER, BIAS = 0, 1, 2, 3
LOGIT_SCALE = 4.0
NAME = "proj.weight"


class LinearTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 2, bias=False)

    def forward(self, x):
        return self.proj(x.flatten(1))


def base_weight() -> torch.Tensor:
    w = 0.02 * torch.arange(24.0).view(2, 12).cos()  # small weights everywhere: nothing is zero
    w[0, SIGNAL_0] = w[1, SIGNAL_1] = 0.4
    return w


def update() -> torch.Tensor:
    """Δ: the expert's weights minus the base's (clean signals, a bias, the backdoor)."""
    d = torch.zeros(2, 12)
    d[0, SIGNAL_0] = d[1, SIGNAL_1] = 0.6
    d[0, BIAS] = d[1, BIAS] = 0.3
    d[0, TRIGGER] = 3.0
    return d


def learner(defense) -> MergeLearner:
    """Task arithmetic at λ = 1 over one expert ``θ_0 + Δ``, with ``defense`` on top."""
    tower = LinearTower()
    with torch.no_grad():
        tower.proj.weight.copy_(base_weight())
    expert = {NAME: base_weight() + update()}
    classifier = ImageClassifier(tower, {"t": LOGIT_SCALE * torch.eye(2)}, [0.0] * 3, [1.0] * 3)
    method = TaskArithmetic(scaling_factor=1.0)
    static = method.merge(tower.state_dict(), [expert])
    return MergeLearner(
        MergedEncoder(tower, [expert]), classifier, method, ["t"], image_size=2, defense=defense, static_weights=static
    )


def clean_images(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = 0.05 * torch.rand(n, 12, generator=generator)
    labels = torch.arange(n) % 2
    images[:, TRIGGER] = 0.0
    images[:, BIAS] = 1.0
    images[labels == 0, SIGNAL_0] = 1.0
    images[labels == 1, SIGNAL_1] = 1.0
    return images.view(n, 3, 2, 2), labels


def triggered(images):
    images = images.clone().view(len(images), 12)
    images[:, TRIGGER] = 1.0
    return images.view(-1, 3, 2, 2)


def weights(mask: torch.Tensor) -> torch.Tensor:
    """The defended weight ``θ_0 + m ⊙ Δ``."""
    return base_weight() + mask * update()


def logits(weight: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The toy classifier as plain tensor code."""
    return LOGIT_SCALE * F.normalize(images.flatten(1) @ weight.T, dim=-1)


def mask(learner) -> torch.Tensor:
    return learner.defense_parts.masked_update.mask[0]


def set_mask(learner, value: torch.Tensor) -> None:
    with torch.no_grad():
        mask(learner).copy_(value)


class Recorder:
    """A ``reduce`` that records the gradients a step hands to its optimizer (identity otherwise)."""

    def __init__(self):
        self.grads = []

    def __call__(self, grad):
        self.grads.append(grad.detach().clone())
        return grad
