"""BatchNorm on vs off in LeNet-5 on Fashion-MNIST, across learning rates.

Command:   python -m jaxcnn sweep experiments/ablate_batchnorm.py --workdir runs/ablate_batchnorm
Question:  does BatchNorm make a network train faster, and does it widen the range of learning rates that
           work (Ioffe & Szegedy 2015)? LeNet-5 with norm='batch' (after every conv, before the activation) or
           norm='none', at SGD learning rates 0.01, 0.1 and 0.5 (momentum 0.9).
Runtime:   not measured yet
Expected:  not measured yet
Full size: --set data.train_limit=none --set train.epochs=20; add rates with a grid of your own.
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import grid, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "lenet5"},
        data=DataConfig(name="fashion_mnist", train_limit=10000, batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        # A diverging run should finish with its (chance-level) accuracy in the table, not stop as failed.
        train=TrainConfig(epochs=3, log_every_steps=20, check_finite=False),
    )


def sweep() -> list[dict]:
    return product(grid({"model.norm": ["batch", "none"], "optim.lr": [0.01, 0.1, 0.5]}), seeds(2))
