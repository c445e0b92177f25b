"""Depth with and without residual connections: plain-20/56 vs ResNet-20/56 (the degradation problem).

Command:   python -m jaxcnn sweep experiments/depth_residual.py --workdir runs/depth_residual
Question:  He et al. (2016) found that a deeper plain network (no shortcuts) trains *worse* than a shallower
           one, on the training set too, so the cause is optimisation, not overfitting; with identity
           shortcuts the deeper network is better. The CIFAR networks here run on Fashion-MNIST (28x28x1: the
           three stages see 28, 14 and 7 pixels), at half width (8/16/32 channels) so that CPU runs stay short.
Runtime:   about 7-12 min on an idle 2-core CPU (8 runs; 780 s of CPU time measured; 16 min wall on a busy one).
Expected:  measured 2026-11-26 with jax 0.10.2 on a 2-core x86 CPU (docs/results/depth_residual.md; 2,000 training
           images, 4 epochs of batch 32, 5,000 test images, mean ± sample std of 2 seeds): plain-20 74.07 ± 1.03%,
           ResNet-20 77.83 ± 1.32%, plain-56 46.88 ± 3.39%, ResNet-56 76.07 ± 1.15%. Going from 20 to 56 layers
           costs the plain net 27 points and its training loss stays about twice as high (1.3-1.5 vs 0.66-0.71 at
           the end): the degradation problem. With shortcuts, 56 layers train about as well as 20; whether they pass
           it with longer training was not measured here.
Full size: --set data.train_limit=none --set data.test_limit=none --set train.eval_every_epochs=1
           --set train.epochs=30 --set model.width=1.0 --set model.stem_width=16, or
           experiments/cifar10_resnet_he.py for the paper's setting (He et al. report 8.75% error for ResNet-20
           and 6.97% for ResNet-56 on CIFAR-10, and plain-56 above plain-20 in their Fig. 6; literature).
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import grid, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "resnet20", "width": 0.5, "stem_width": 8},
        data=DataConfig(name="fashion_mnist", train_limit=10000, batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        train=TrainConfig(epochs=6, log_every_steps=50, eval_every_epochs=0),
    )


def sweep() -> list[dict]:
    return product(grid({"model.name": ["plain20", "resnet20", "plain56", "resnet56"]}), seeds(5))
