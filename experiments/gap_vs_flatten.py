"""Global average pooling head vs flatten + fully connected head, in LeNet-5 on Fashion-MNIST.

Command:   python -m jaxcnn sweep experiments/gap_vs_flatten.py --workdir runs/gap_vs_flatten
Question:  the head of LeNet-5 flattens its 16x5x5 feature maps into fc120-fc84 (most of its parameters). Network
           in Network (Lin et al. 2014) and every ResNet average each feature map to one number instead: far
           fewer parameters, and no dependence on where in the image a feature was seen. What does it cost?
           Variants: flatten (the default), GAP followed by the same fc120-fc84, and GAP straight to the logits;
           then flatten and GAP-to-logits again with 64 channels in the last conv instead of 16.
Runtime:   15 min 22 s wall for the 25 runs (1,642 s of CPU time; 26-51 s per run), measured 2026-12-07 on an
           idle 2-core Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX) (docs/results/gap_vs_flatten.md;
           all 60,000 training images, 12 epochs, mean ± sample std of 5 seeds; Δ: difference to flatten-fc120-fc84
           with its 95% Welch interval): flatten-fc120-fc84 91.41 ± 0.09% (61,706 parameters); GAP-fc120-fc84
           88.12 ± 0.27% (15,626; Δ -3.29 [-3.62, -2.97]); GAP-linear 86.92 ± 0.53% (2,742; -4.49 [-5.14, -3.84]).
           With 64 channels: flatten 91.78 ± 0.27% (212,954; +0.37 [+0.04, +0.71]), GAP-linear 88.83 ± 0.32%
           (10,470; -2.58 [-2.97, -2.18]). GAP costs 2.6-4.5 points here, and its runs end with a higher training
           loss too (0.27-0.33 vs 0.12 over the last epoch). A likely reason (not tested here): the last features
           of this two-layer net see only 16x16 pixels, so where a feature was seen carries much of the class;
           GAP is the head of deep nets (ResNet, NiN) whose last features see the whole image.
Full size: the default is the full training set; --set data.train_limit=10000 --set train.epochs=3 for a quick
           look.
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, named, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "lenet5"},
        data=DataConfig(name="fashion_mnist", batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        train=TrainConfig(epochs=12, log_every_steps=100),
    )


def sweep() -> list[dict]:
    variants = chain(
        named("flatten-fc120-fc84", {"model.head": "flatten"}),
        named("gap-fc120-fc84", {"model.head": "gap"}),
        named("gap-linear", {"model.head": "gap", "model.head_hidden": ()}),
        # The same with 64 instead of 16 channels in the last conv: GAP wants many feature maps to average.
        named("wide-flatten-fc120-fc84", {"model.conv_channels": (6, 64)}),
        named("wide-gap-linear", {"model.conv_channels": (6, 64), "model.head": "gap", "model.head_hidden": ()}),
    )
    return product(variants, seeds(5))
