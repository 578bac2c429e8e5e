"""Small, structurally faithful PyTorch versions of the three CNN families.

Plain ``torch.nn`` (no torchvision).  Input 3x64x64; each net has well under
a few hundred thousand parameters so the CPU tests stay fast.

* :func:`vgg_bn`     -- VGG-style conv-BN-ReLU chain, max pools, flatten, linear head
* :func:`resnet`     -- ResNet stem, BasicBlock and Bottleneck blocks with strided
                        1x1-conv+BN downsample branches and the residual ``+``
* :func:`mobilenet_v2` -- inverted residuals (1x1 expansion, depthwise 3x3,
                        ReLU6, linear bottleneck, residual add when stride 1 and
                        same channels), AdaptiveAvgPool2d(1), flatten, Linear

:func:`randomize` gives every BatchNorm non-trivial running statistics and
affine parameters and puts the model in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

# One intra-op thread: these nets are tiny, and on a loaded 2-core machine
# torch's thread pool spins and makes a 10 ms forward take over a second.
torch.set_num_threads(1)

INPUT_SHAPE = (3, 64, 64)
BATCH = 2


def _cbr(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act(inplace=True)]


class VGGBN(nn.Module):
    """conv-BN-ReLU blocks with max pools, then flatten and a two-layer head."""

    def __init__(self, cfg=(8, "M", 16, "M", 32, 32, "M", 32, "M"), classes=10):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += _cbr(c, v)
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * 4 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(32, classes))

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(torch.add(out, identity))


class ResNet(nn.Module):
    """Stem conv/BN/ReLU/maxpool, two BasicBlock stages, two Bottleneck stages."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 24, 2), BasicBlock(24, 24))
        self.layer3 = nn.Sequential(Bottleneck(24, 8, 2), Bottleneck(32, 8))
        self.layer4 = nn.Sequential(Bottleneck(32, 12, 2), Bottleneck(48, 12))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += _cbr(cin, hidden, 1, act=nn.ReLU6)
        layers += _cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem, inverted residual stages (t, c, n, s), 1x1 head conv, pool, linear."""

    def __init__(self, classes=10, setting=((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2), (4, 24, 2, 2))):
        super().__init__()
        layers = _cbr(3, 8, 3, 2, act=nn.ReLU6)
        c = 8
        for t, cout, n, s in setting:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers += _cbr(c, 64, 1, act=nn.ReLU6)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        x = self.pool(self.features(x))
        x = x.flatten(1)
        return self.classifier(x)


FAMILIES = {"vgg_bn": VGGBN, "resnet": ResNet, "mobilenet_v2": MobileNetV2}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights (fixed seed), non-trivial BN stats/affine; eval mode.

    Every BatchNorm gets running_mean ~ N(0, 0.3), running_var ~ U(0.5, 2),
    gamma ~ U(0.5, 1.5), beta ~ N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """A randomised, eval-mode instance of family ``name``."""
    torch.manual_seed(seed)
    return randomize(FAMILIES[name](), seed)


def example_input(seed: int = 0) -> torch.Tensor:
    """(2, 3, 64, 64) float32 input."""
    return torch.randn((BATCH,) + INPUT_SHAPE, generator=torch.Generator().manual_seed(seed + 1000))
