"""Plain PyTorch twins of the jaxcnn models the speed benchmarks compare (benchmarks/vs_pytorch.py).

Each twin has the same layers, widths, paddings, BatchNorm settings (momentum 0.1 = flax's 0.9, eps 1e-5),
biases and parameter count as its jaxcnn model, so one training step does the same arithmetic:

- ``resnet20``: CIFAR ResNet-20 (He et al., 2015): 3x3 stem with 16 channels, three stages of three basic blocks
  (16/32/64 channels), option-A shortcuts (stride subsampling + zero channels), global average pool, linear.
  269,722 parameters at 10 classes (jaxcnn's ``create_model('resnet20')``).
- ``lenet5``: zero-pad 28x28 to 32x32, conv5x5·6 - ReLU - max pool 2 - conv5x5·16 - ReLU - max pool 2 - fc120 -
  fc84 - logits: 61,706 parameters (jaxcnn's ``lenet5``).
- ``mlp``: 784-300-100-10 with ReLU: 266,610 parameters (jaxcnn's ``mlp``).
- ``vgg11``: VGG-11 with BatchNorm (conv biases kept, as torchvision's) and a CIFAR head (global average pool,
  linear), jaxcnn's ``create_model('vgg11_bn', head='gap', head_hidden=(), dropout=0.0)``.
- ``resnet18`` / ``resnet50``: the ImageNet ResNets as torchvision builds them (7x7 stride-2 stem, 3x3 max pool,
  basic / bottleneck blocks with the stride on the 3x3 conv, projection shortcuts with BatchNorm, global average
  pool, linear): 11,689,512 / 25,557,032 parameters at 1000 classes (jaxcnn's ``resnet18`` / ``resnet50``).

Inputs are NCHW float tensors (PyTorch's default layout); `make_torch_model(name, channels_last=True)` converts the
model to NHWC memory (``torch.channels_last``), the layout jaxcnn uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.1  # PyTorch's convention; flax's momentum 0.9 is the same running-average update
BN_EPS = 1e-5


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, ReLU between and after the sum; option-A shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x
        if self.stride > 1 or self.extra:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))  # zero channels at the end
        return F.relu(y + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with option-A shortcuts. x: [N, 3, 32, 32] -> logits [N, num_classes]."""

    def __init__(self, n: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0], eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(_BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


class LeNet5(nn.Module):
    """LeNet-5 as jaxcnn builds it (ReLU, max pooling, 28x28 padded to 32x32). x: [N, 1, H, W] -> [N, 10]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = max(32 - x.shape[2], 0), max(32 - x.shape[3], 0)
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLP(nn.Module):
    """Flatten, 300 ReLU, 100 ReLU, logits (LeCun et al., 1998's 784-300-100-10). x: [N, ...] -> [N, 10]."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (300, 100), num_classes: int = 10) -> None:
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class VGG(nn.Module):
    """VGG with BatchNorm (conv biases kept) and a global-average-pool + linear head. x: [N, in_channels, H, W]."""

    def __init__(self, stage_sizes: tuple[int, ...] = (1, 1, 2, 2, 2),
                 stage_widths: tuple[int, ...] = (64, 128, 256, 512, 512), num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for size, width in zip(stage_sizes, stage_widths):
            for _ in range(size):
                layers += [nn.Conv2d(cin, width, 3, 1, 1), nn.BatchNorm2d(width, eps=BN_EPS, momentum=BN_MOMENTUM),
                           nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class _ImageNetBlock(nn.Module):
    """torchvision's BasicBlock (bottleneck=False) or Bottleneck (v1.5: the stride on the 3x3 conv)."""

    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        cout = width * 4 if bottleneck else width
        if bottleneck:
            convs = [nn.Conv2d(cin, width, 1, bias=False), nn.Conv2d(width, width, 3, stride, 1, bias=False),
                     nn.Conv2d(width, cout, 1, bias=False)]
        else:
            convs = [nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.Conv2d(width, width, 3, 1, 1, bias=False)]
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c.out_channels, eps=BN_EPS, momentum=BN_MOMENTUM) for c in convs)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = bn(conv(y))
            if i < len(self.convs) - 1:
                y = F.relu(y)
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ImageNetResNet(nn.Module):
    """torchvision-style ResNet. x: [N, 3, H, W] -> logits [N, num_classes]."""

    def __init__(self, stage_sizes: tuple[int, ...], bottleneck: bool, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.stem_bn = nn.BatchNorm2d(64, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks, cin = [], 64
        for i, size in enumerate(stage_sizes):
            width = 64 * 2**i
            for j in range(size):
                blocks.append(_ImageNetBlock(cin, width, 2 if (i > 0 and j == 0) else 1, bottleneck))
                cin = width * 4 if bottleneck else width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_bn(self.stem(x))), 3, 2, 1)
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


TORCH_MODELS = {
    "resnet20": lambda num_classes: CifarResNet(3, num_classes),
    "resnet56": lambda num_classes: CifarResNet(9, num_classes),
    "lenet5": LeNet5,
    "mlp": lambda num_classes: MLP(num_classes=num_classes),
    "vgg11": lambda num_classes: VGG(num_classes=num_classes),
    "resnet18": lambda num_classes: ImageNetResNet((2, 2, 2, 2), False, num_classes),
    "resnet50": lambda num_classes: ImageNetResNet((3, 4, 6, 3), True, num_classes),
}


def make_torch_model(name: str, num_classes: int = 10, *, channels_last: bool = False) -> nn.Module:
    """The PyTorch twin called `name` (a key of `TORCH_MODELS`), in training mode."""
    if name not in TORCH_MODELS:
        raise ValueError(f"no PyTorch twin for {name!r}; choose one of {', '.join(TORCH_MODELS)}")
    model = TORCH_MODELS[name](num_classes).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
