"""Depth with and without residual connections: plain-20/56 vs ResNet-20/56 (the degradation problem).

Command:   python -m jaxcnn sweep experiments/depth_residual.py --workdir runs/depth_residual
Question:  He et al. (2016) found that a deeper plain network (no shortcuts) trains *worse* than a shallower
           one, on the training set too, so the cause is optimisation, not overfitting; with identity
           shortcuts the deeper network is better. The CIFAR networks here run on Fashion-MNIST (28x28x1: the
           three stages see 28, 14 and 7 pixels), at half width (8/16/32 channels) so that CPU runs stay short.
Runtime:   19 min 29 s wall for the 20 runs (2,129 s of CPU time; 30-84 s per run), measured 2026-12-07 on an
           idle 2-core Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX) (docs/results/depth_residual.md;
           the first 10,000 training images, batch 128, lr 0.1, 6 epochs, all 10,000 test images, mean ± sample
           std of 5 seeds; Δ: difference to plain-20 with its 95% Welch interval): plain-20 85.65 ± 0.86%,
           ResNet-20 87.14 ± 0.39% (Δ +1.49 [+0.43, +2.55]), plain-56 75.04 ± 2.79% (-10.61 [-14.02, -7.21]),
           ResNet-56 86.26 ± 0.78% (+0.61 [-0.59, +1.81]). Going from 20 to 56 layers costs the plain net about 11
           points, and its training loss over the last epoch is about twice as high (0.64 vs 0.33): the
           degradation problem. With shortcuts, 56 layers train about as well as 20 (ResNet-56 vs ResNet-20:
           -0.88 [-1.84, +0.08], within the noise); whether they pass it with longer training was not measured.
Full size: --set data.train_limit=none (all 60,000 training images), and for the paper's widths --set model.width=1.0
           --set model.stem_width=16. Not the default: on all 60,000 images one half-width ResNet-20 run takes about 2.5
           min and one ResNet-56 run about 7 min on this idle 2-core CPU (6 epochs at 2,560 and 875 images/s), so 5
           seeds of 4 variants would take about 1.5 hours. experiments/cifar10_resnet_he.py has the paper's setting (He
           et al. report 8.75% error for ResNet-20 and 6.97% for ResNet-56 on CIFAR-10, and plain-56 above plain-20 in
           their Fig. 6; literature).
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
