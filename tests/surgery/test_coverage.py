"""Coverage of model code surgery did not see written: tails after the classifier, channel splits,
concatenations, the coverage report and the default skip (hand-written models; timm / torchvision in
test_zoo.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.surgery import nest
from tests.surgery.checks import assert_earlier_subnets_ignore_later_groups, assert_paths_agree, relative_error
from tests.surgery.toys import randomize_batch_norm


def _images(n: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class SplitNet(nn.Module):
    """A block that splits its channels into fixed-size parts (``torch.split`` / ``chunk`` / slices)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.project = nn.Conv2d(8, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.expand(self.stem(x))
        if self.how == "split":
            a, b = torch.split(x, [8, 8], dim=1)
        elif self.how == "chunk":
            a, b = x.chunk(2, dim=1)
        else:
            a, b = x[:, :8], x[:, 8:]
        return self.fc(torch.flatten(self.pool(self.project(self.branch(a) + b)), 1))


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_a_model_that_splits_channels_is_never_accepted_and_then_crashes(how):
    """Nested then crashed at the first sub-network forward (split_with_sizes expects split_sizes to sum
    exactly to ...): the split must either be nested or kept in the un-nested part, and the RDN must run."""
    torch.manual_seed(0)
    model = randomize_batch_norm(SplitNet(how), torch.Generator().manual_seed(0))
    images = _images()
    try:
        net = nest(model, k=2, calib=images, skip=["stem"]).eval()
    except ValueError as error:  # refused: the message names the split
        assert "split" in str(error) or "chunk" in str(error) or "getitem" in str(error), error
        return
    assert_paths_agree(net, images, export=True)
    assert_earlier_subnets_ignore_later_groups(net, images)
    with torch.no_grad():
        assert relative_error(net(images)[-1], model(images)) < 1e-5
