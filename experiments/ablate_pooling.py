"""Pooling in LeNet-5 on Fashion-MNIST: max vs average vs L2 pooling vs strided convolution.

Command:   python -m jaxcnn sweep experiments/ablate_pooling.py --workdir runs/ablate_pooling
Question:  how much does the choice of downsampling matter? The same LeNet-5 with 2x2 max, average or L2 pooling,
           or with no pooling at all and stride-2 convolutions instead (the same output shapes; the learned
           downsampling of all-convolutional nets, Springenberg et al. 2015).
Runtime:   8 min 42 s wall for the 20 runs (901 s of CPU time; 13-33 s per run), measured 2026-12-07 on an idle
           2-core Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX) (docs/results/ablate_pooling.md;
           all 60,000 training images, 12 epochs, mean ± sample std of 5 seeds; Δ: difference to max pooling with
           its 95% Welch interval): max 91.41 ± 0.09%, average 91.61 ± 0.10% (Δ +0.20 [+0.07, +0.34]), L2 91.50 ±
           0.19% (+0.09 [-0.15, +0.33]), strided conv 90.28 ± 0.19% (-1.13 [-1.36, -0.90]). The three poolings
           end within 0.2 points of each other (average a resolved 0.2 above max, L2 within the noise); stride-2
           convs lose about 1 point but need a third of the FLOPs (297 k vs 833 k per image) and train fastest.
Full size: the default is the full training set; --set data.train_limit=10000 --set train.epochs=3 for a quick
           look.
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, grid, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "lenet5"},
        data=DataConfig(name="fashion_mnist", batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        train=TrainConfig(epochs=12, log_every_steps=100),
    )


def sweep() -> list[dict]:
    variants = chain(grid({"model.pool": ["max", "avg", "l2"]}), grid({"model.downsample": ["conv"]}))
    return product(variants, seeds(5))
