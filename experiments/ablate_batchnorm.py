"""BatchNorm on vs off in a small all-convolutional LeNet, across learning rates.

Command:   python -m jaxcnn sweep experiments/ablate_batchnorm.py --workdir runs/ablate_batchnorm
Question:  does BatchNorm make a network train faster, and does it widen the range of learning rates that
           work (Ioffe & Szegedy 2015)? LeNet-5's two conv layers (6 and 16 channels, 5x5, max pooling) with a
           linear classifier on the flattened features (`head_hidden=()`), so that every hidden layer is a conv
           that BatchNorm normalises: norm='batch' (after each conv, before the ReLU) or norm='none', at SGD
           learning rates 0.02, 0.1, 0.5 and 2.0 (momentum 0.9), on Fashion-MNIST.
           With LeNet-5's own fc120-fc84 head (`--set model.head_hidden=120,84`), which BatchNorm does not
           touch, at lr 0.5 both BatchNorm runs collapsed to chance (10%) and the plain ones reached 44% (lr 0.1:
           85.0 vs 85.2%; docs/results/ablate_batchnorm.md): the un-normalised head, not the convs, sets the
           usable rate.
Runtime:   about 3-5 min on an idle 2-core CPU (16 runs; 292 s of CPU time measured; 7 min wall on a busy one).
Expected:  measured 2026-11-26 (docs/results/ablate_batchnorm.md; jax 0.10.2, 2-core x86 CPU; 10,000 training images, 3 epochs, mean ± sample std of
           2 seeds), test accuracy with / without BatchNorm: lr 0.02: 83.81 ± 0.22 / 83.68 ± 0.06%; lr 0.1:
           85.56 ± 0.01 / 84.58 ± 1.56%; lr 0.5: 84.00 ± 1.03 / 10.00% (chance: diverged); lr 2.0: both 10.00%.
           BatchNorm trains at 5x the rate that breaks the plain network, and is a little better and steadier
           at the best rate.
Full size: --set data.train_limit=none --set train.epochs=20; add rates with a grid of your own.
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
