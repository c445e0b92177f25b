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
Runtime:   about 3-5 min on an idle 2-core CPU (8 runs; 379 s of CPU time measured; 5.6 min wall on a busy one).
Expected:  measured 2026-11-26 with jax 0.10.2 on a 2-core x86 CPU (docs/results/bottleneck_groups.md; 2,000
           training images, 4 epochs of batch 32, 5,000 test images, mean ± sample std of 2 seeds): basic 77.16 ±
           0.08% (75,002 parameters, 18.3 MFLOPs per image), basic-g4 74.20 ± 0.20% (19,706, 4.7 M), bottleneck
           74.07 ± 0.69% (33,498, 8.4 M), bottleneck-g4 74.47 ± 0.61% (41,786, 11.4 M). The cheaper blocks give up
           about 3 points at a quarter to a half of the cost. FLOPs are not time here: on XLA:CPU the grouped
           variants trained at a third of the basic block's images/s despite 1.6-3.9x fewer FLOPs (rough figures,
           busy machine).
Full size: --set data.train_limit=none --set data.test_limit=none --set train.eval_every_epochs=1
           --set train.epochs=20.
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
