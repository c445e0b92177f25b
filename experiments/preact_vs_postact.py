"""Pre-activation vs post-activation residual blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Command:   python -m jaxcnn sweep experiments/preact_vs_postact.py --workdir runs/preact_vs_postact
Question:  post-activation blocks (conv-BN-ReLU-conv-BN, add, ReLU: the original ResNet) put a ReLU on the
           shortcut path after every addition; pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv, add) keep the
           shortcut a pure identity from input to output. Does it matter for a 20-layer network? The same
           ResNet-20 at half width (8/16/32 channels) on Fashion-MNIST, option-A shortcuts in both, only
           `model.preact` changes.
Runtime:   5 min 08 s wall for the 10 runs (548 s of CPU time; about 30 s per run), measured 2026-12-07 on an
           idle 2-core Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX)
           (docs/results/preact_vs_postact.md; the first 10,000 training images, batch 128, lr 0.1, 6 epochs, all
           10,000 test images, mean ± sample std of 5 seeds): post-activation 87.14 ± 0.39%, pre-activation 87.17 ±
           0.54% (Δ +0.03 [-0.67, +0.73], 95% Welch interval): no difference beyond the seed noise at 20 layers
           and this budget. The paper's gains are for deep networks (110 to 1001 layers) trained to convergence.
Full size: --set data.train_limit=none (all 60,000 training images); for the paper's setting also --set train.epochs=30
           --set model.name=resnet110 --set model.width=1.0 --set model.stem_width=16 (He et al. 2016 report CIFAR-10
           error 6.61% post-activation vs 6.37% pre-activation for ResNet-110, and a larger gap at 1001 layers;
           literature). Not the default: on all 60,000 images one half-width ResNet-20 run takes about 2.5 min and one
           ResNet-56 run about 7 min on this idle 2-core CPU (6 epochs at 2,560 and 875 images/s), so these 10 runs
           would take about 25 min and the suite's four ResNet sweeps (5 seeds of up to 5 variants) hours.
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
    return product(grid({"model.preact": [False, True]}), seeds(5))
