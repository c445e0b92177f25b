"""Pooling in LeNet-5 on Fashion-MNIST: max vs average vs L2 pooling vs strided convolution.

Command:   python -m jaxcnn sweep experiments/ablate_pooling.py --workdir runs/ablate_pooling
Question:  how much does the choice of downsampling matter? The same LeNet-5 with 2x2 max, average or L2 pooling,
           or with no pooling at all and stride-2 convolutions instead (the same output shapes; the learned
           downsampling of all-convolutional nets, Springenberg et al. 2015).
Runtime:   about 2-4 min on an idle 2-core CPU (12 runs; 211 s of CPU time measured; 11 min wall on a busy one).
Expected:  measured 2026-11-26 with jax 0.10.2 on a 2-core x86 CPU (docs/results/ablate_pooling.md; 10,000 training
           images, 3 epochs, mean ± sample std of 3 seeds): max 85.42 ± 0.37%, L2 85.35 ± 0.89%, average 83.48 ±
           0.67%, strided conv 83.79 ± 0.32%. Max and L2 pooling beat average pooling by about 2 points; stride-2
           convs lose as much but need a third of the FLOPs (297 k vs 833 k per image) and were the fastest to train
           here (the images/s in the table come from a busy machine and are rough). With 3 seeds, max vs L2 is
           within the noise.
Full size: --set data.train_limit=none --set train.epochs=20.
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
