"""BatchNorm on vs off in a small all-convolutional LeNet, across learning rates.

Command:   python -m jaxcnn sweep experiments/ablate_batchnorm.py --workdir runs/ablate_batchnorm
Question:  does BatchNorm make a network train faster, and does it widen the range of learning rates that
           work (Ioffe & Szegedy 2015)? LeNet-5's two conv layers (6 and 16 channels, 5x5, max pooling) with a
           linear classifier on the flattened features (`head_hidden=()`), so that every hidden layer is a conv
           that BatchNorm normalises: norm='batch' (after each conv, before the ReLU) or norm='none', at SGD
           learning rates 0.02, 0.1, 0.5 and 2.0 (momentum 0.9), on Fashion-MNIST.
           With LeNet-5's own fc120-fc84 head (`--set model.head_hidden=120,84`), which BatchNorm does not
           touch, at lr 0.5 both BatchNorm runs collapsed to chance (10%) and the plain ones reached 44% (lr 0.1:
           85.0 vs 85.2%; measured 2026-11-26 at 10,000 training images, 3 epochs, 2 seeds;
           docs/results/ablate_batchnorm.md): the un-normalised head, not the convs, sets the usable rate.
Runtime:   10 min 50 s wall for the 40 runs (1,154 s of CPU time; 15-17 s per run), measured 2026-12-07 on an
           idle 2-core Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX)
           (docs/results/ablate_batchnorm.md; all 60,000 training images, 8 epochs, mean ± sample std of 5 seeds),
           test accuracy with / without BatchNorm: lr 0.02: 89.44 ± 0.28 / 89.54 ± 0.34%; lr 0.1: 90.28 ± 0.21 /
           89.74 ± 0.13%; lr 0.5: 88.35 ± 0.30 / 48.71 ± 35.53% (two plain seeds at chance, the others 71.5-80.6%);
           lr 2.0: both 10.00% (chance). BatchNorm minus none, with 95% Welch intervals: lr 0.02 -0.10 [-0.56,
           +0.36] (within the noise), lr 0.1 +0.53 [+0.27, +0.80], lr 0.5 +39.64 [-4.47, +83.76] (every BatchNorm
           seed above every plain one, but the plain seeds' spread keeps 0 in the interval). At 5x the best rate
           BatchNorm trains every seed, where two of five plain seeds stay at chance; at the best rate it is a
           little better.
Full size: the default is the full training set; --set data.train_limit=10000 --set train.epochs=3 for a quick
           look; add rates with a grid of your own.
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import grid, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "lenet5", "head_hidden": ()},
        data=DataConfig(name="fashion_mnist", batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        # A diverging run should finish with its (chance-level) accuracy in the table, not stop as failed.
        train=TrainConfig(epochs=8, log_every_steps=100, check_finite=False),
    )


def sweep() -> list[dict]:
    return product(grid({"model.norm": ["batch", "none"], "optim.lr": [0.02, 0.1, 0.5, 2.0]}), seeds(5))
