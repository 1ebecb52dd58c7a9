"""fold_batch_norms (rdn/surgery/fold.py): an inference copy whose BNs live in the convs they read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdn.nn import NestedConv2d
from rdn.surgery import nest
from rdn.surgery.fold import fold_batch_norms
from tests.surgery.checks import logits_by_path
from tests.surgery.toys import randomize_batch_norm, toy

CALIB = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
IMAGES = torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(7))


def _toy() -> nn.Module:
    return randomize_batch_norm(toy(), torch.Generator().manual_seed(1)).eval()  # BNs that are not identities


@pytest.mark.parametrize(
    "settings",
    [dict(exact=True), dict(copy_fraction=0.5, mac_budget=None), dict(mode="truncate"),
     dict(exact=True, depth_split="body.2")],  # fmt: skip
    ids=["exact", "copies", "truncate", "depth_split"],
)
def test_every_path_of_the_folded_copy_equals_the_network(settings):
    net = nest(_toy(), k=3, calib=CALIB, skip=["stem"], **settings).eval()
    folded = fold_batch_norms(net)
    norms = [name for name, layer in net.layers.items() if type(layer) is nn.BatchNorm2d]
    assert set(folded.folded_norms) == set(norms) and len(norms) >= 5  # every BN of the toy follows a conv
    assert all(type(folded.layers[name]) is nn.Identity for name in norms)
    assert any(isinstance(folded.layers[name], NestedConv2d) and folded.layers[name].bias is not None
               for name in folded.layers)  # fmt: skip
    exits = range(1, net.num_subnets + 1)
    expected, got = logits_by_path(net, IMAGES, exits), logits_by_path(folded, IMAGES, exits)
    for path, logits in expected.items():
        for exit_, value in logits.items():
            torch.testing.assert_close(got[path][exit_], value, atol=1e-5, rtol=1e-5, msg=f"{path}, exit {exit_}")
    # the network itself is untouched
    assert all(type(net.layers[name]) is nn.BatchNorm2d for name in norms)


def test_norms_the_fold_cannot_take_stay():
    """A BN without running statistics, or after a conv whose output something else reads too, is kept."""

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.conv = nn.Conv2d(8, 8, 1)
            self.norm = nn.BatchNorm2d(8)  # its conv's output is also added below: not folded
            self.other = nn.Conv2d(8, 8, 1)
            self.stateless = nn.BatchNorm2d(8, track_running_stats=False)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            y = self.conv(x)
            z = self.norm(y) + y
            return self.fc(self.stateless(self.other(z)).mean((2, 3)))

    model = Branching().eval()
    randomize_batch_norm(nn.ModuleList([model.stem, model.norm]), torch.Generator().manual_seed(0))
    net = nest(model, k=2, calib=CALIB, skip=["stem"], exact=True).eval()
    folded = fold_batch_norms(net)
    assert folded.folded_norms == ("stem_1",)
    with torch.no_grad():
        for subnet in range(1, net.num_subnets + 1):
            torch.testing.assert_close(folded(IMAGES, subnet=subnet), net(IMAGES, subnet=subnet), atol=1e-5, rtol=1e-5)


def test_only_networks_fold():
    with pytest.raises(TypeError, match="net must be a RussianDollNet"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
