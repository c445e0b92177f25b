"""1x1 bottlenecks and grouped convolutions in a small ResNet (the ideas of ResNet-50 and ResNeXt).

Command:   python -m jaxcnn sweep experiments/bottleneck_groups.py --workdir runs/bottleneck_groups
Question:  a bottleneck block (1x1 reduce, 3x3, 1x1 expand) lets a network carry 4x wider features for about the
           cost of a basic block; grouped 3x3 convolutions (ResNeXt, Xie et al. 2017) split channels into
           groups that do not see each other, dividing the 3x3 cost by the number of groups. A small ResNet
           (one block per stage) on Fashion-MNIST:
           - basic: two 3x3 convs per block, 16/32/64 channels;
           - basic-g4: the same with 4 groups in every 3x3 conv;
           - bottleneck: 1x1-3x3-1x1 with 8/16/32 inner and 32/64/128 outer channels, projection shortcuts;
           - bottleneck-g4: its 3x3 convs grouped 4 ways at twice the inner width (16/32/64: ResNeXt's trade).
           The table's parameter and FLOP columns say what each costs.
Runtime:   9 min 19 s wall for the 20 runs (970 s of CPU time), measured 2026-12-07 on an otherwise idle 2-core
           Intel Xeon (AVX-512, AMX).
Expected:  measured 2026-12-07 with jax 0.10.2 on a 2-core Intel Xeon (AVX-512, AMX)
           (docs/results/bottleneck_groups.md; the first 10,000 training images, batch 128, lr 0.1, 6 epochs, all
           10,000 test images, mean ± sample std of 5 seeds; Δ: difference to basic with its 95% Welch interval):
           basic 86.72 ± 0.17% (75,002 parameters, 18.3 MFLOPs per image), basic-g4 84.31 ± 0.77% (19,706, 4.7 M;
           Δ -2.40 [-3.35, -1.45]), bottleneck 84.79 ± 0.34% (33,498, 8.4 M; -1.92 [-2.34, -1.50]), bottleneck-g4
           84.61 ± 0.41% (41,786, 11.4 M; -2.10 [-2.61, -1.60]). The cheaper blocks give up about 2 points at a
           quarter to three fifths of the FLOPs, and are within the noise of each other. FLOPs are not time on
           XLA:CPU: basic-g4 trained 1.5x as many images/s as basic (3.9x fewer FLOPs), bottleneck and
           bottleneck-g4 only 0.77x and 0.52x (2.2x and 1.6x fewer FLOPs).
Full size: --set data.train_limit=none (all 60,000 training images). Not the default: the four ResNet experiments share
           this setting; on all 60,000 images one half-width ResNet-20 run takes about 2.5 min and one ResNet-56 run
           about 7 min on this idle 2-core CPU (6 epochs at 2,560 and 875 images/s), so 5 seeds of 4 variants would take
           about 1.5 hours (the networks here are smaller, and this sweep would take roughly six times its measured
           time, about 56 min).
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, named, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "resnet20", "stage_sizes": (1, 1, 1)},
        data=DataConfig(name="fashion_mnist", train_limit=10000, batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        train=TrainConfig(epochs=6, log_every_steps=50, eval_every_epochs=0),
    )


def sweep() -> list[dict]:
    bottleneck = {"model.block": "bottleneck", "model.shortcut": "B", "model.stage_widths": (8, 16, 32)}
    variants = chain(
        named("basic", {}),
        named("basic-g4", {"model.groups": 4}),
        named("bottleneck", bottleneck),
        named("bottleneck-g4", {**bottleneck, "model.groups": 4, "model.base_width": 32}),
    )
    return product(variants, seeds(5))
