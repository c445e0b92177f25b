"""Kernel size 3 vs 5 vs 7, at equal depth, at equal receptive field and at equal parameters.

Command:   python -m jaxcnn sweep experiments/kernel_size.py --workdir runs/kernel_size
Question:  VGG (Simonyan & Zisserman 2015) argued for stacks of 3x3 convolutions: two 3x3 layers see a 5x5
           window with 18 instead of 25 weights per channel pair, and add a nonlinearity. A small ResNet (one
           basic block per stage, 8/16/32 channels) on Fashion-MNIST:
           - k3, k5, k7: the same network with bigger kernels (more parameters and a bigger receptive field);
           - k3-deep: 3x3 kernels and two blocks per stage, the receptive field of k5 with fewer parameters;
           - k7-thin: 7x7 kernels at 3/7 of the width, about the parameters of k3.
           `python -m jaxcnn summary resnet20 --set stage_sizes=1,1,1 --set kernel_size=5 --input 28,28,1` shows
           each layer's receptive field.
Runtime:   8 min 56 s wall for the 25 runs (935 s of CPU time; 12-31 s per run), measured 2026-12-07 on an
           idle 2-core Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX) (docs/results/kernel_size.md;
           the first 10,000 training images, batch 128, lr 0.1, 6 epochs, all 10,000 test images, mean ± sample
           std of 5 seeds; Δ: difference to k3 with its 95% Welch interval): k3 85.20 ± 0.62% (19,074 parameters),
           k5 86.64 ± 0.64% (51,842; Δ +1.43 [+0.52, +2.35]), k7 86.91 ± 0.50% (100,994; +1.71 [+0.88, +2.53]),
           k3-deep 86.58 ± 0.69% (43,490; +1.38 [+0.42, +2.34]), k7-thin 84.45 ± 0.24% (18,997; -0.75 [-1.51,
           +0.01]). Everything that widens the receptive field of this shallow net (one block per stage) helped:
           bigger kernels or more 3x3 layers, equally at equal receptive field (k5 vs k3-deep within the noise,
           k3-deep with 16% fewer parameters); at equal parameters, 7x7 kernels on fewer channels were below 3x3,
           by an interval that just includes 0.
Full size: --set data.train_limit=none (all 60,000 training images). Not the default: the four ResNet experiments share
           this setting; on all 60,000 images one half-width ResNet-20 run takes about 2.5 min and one ResNet-56 run
           about 7 min on this idle 2-core CPU (6 epochs at 2,560 and 875 images/s), so 5 seeds of 4 variants would take
           about 1.5 hours (the networks here are smaller, and this sweep would take roughly six times its measured
           time).
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, named, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "resnet20", "stage_sizes": (1, 1, 1), "width": 0.5, "stem_width": 8},
        data=DataConfig(name="fashion_mnist", train_limit=10000, batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        train=TrainConfig(epochs=6, log_every_steps=50, eval_every_epochs=0),
    )


def sweep() -> list[dict]:
    variants = chain(
        named("k3", {"model.kernel_size": 3}),
        named("k5", {"model.kernel_size": 5}),
        named("k7", {"model.kernel_size": 7}),
        named("k3-deep-rf-of-k5", {"model.kernel_size": 3, "model.stage_sizes": (2, 2, 2)}),
        named("k7-thin-params-of-k3", {"model.kernel_size": 7, "model.width": 1.5 / 7, "model.stem_width": 3}),
    )
    return product(variants, seeds(5))
