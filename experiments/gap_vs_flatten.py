"""Global average pooling head vs flatten + fully connected head, in LeNet-5 on Fashion-MNIST.

Command:   python -m jaxcnn sweep experiments/gap_vs_flatten.py --workdir runs/gap_vs_flatten
Question:  the head of LeNet-5 flattens its 16x5x5 feature maps into fc120-fc84 (most of its parameters). Network
           in Network (Lin et al. 2014) and every ResNet average each feature map to one number instead: far
           fewer parameters, and no dependence on where in the image a feature was seen. What does it cost?
           Variants: flatten (the default), GAP followed by the same fc120-fc84, and GAP straight to the logits;
           then flatten and GAP-to-logits again with 64 channels in the last conv instead of 16.
Runtime:   about 3-6 min on an idle 2-core CPU (15 runs; 398 s of CPU time measured; 16 min wall on a busy one).
Expected:  measured 2026-11-26 with jax 0.10.2 on a 2-core x86 CPU (docs/results/gap_vs_flatten.md; 10,000 training
           images, 3 epochs, mean ± sample std of 3 seeds): flatten-fc120-fc84 85.42 ± 0.37% (61,706 parameters);
           GAP-fc120-fc84 52.65 ± 37.85% (one seed stuck at chance, the others 73.5 and 75.5%); GAP-linear 73.90 ±
           0.66% (2,742 parameters). With 64 channels: flatten 86.85 ± 0.21% (212,954), GAP-linear 76.34 ± 0.54%
           (10,470). GAP costs about 10 points here. A likely reason (not tested here): the last features of this
           two-layer net see only 16x16 pixels, so where a feature was seen carries much of the class; GAP is the
           head of deep nets (ResNet, NiN) whose last features see the whole image.
Full size: --set data.train_limit=none --set train.epochs=20.
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
