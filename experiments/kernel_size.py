"""Kernel size 3 vs 5 vs 7, at equal depth, at equal receptive field and at equal parameters.

Command:   python -m jaxcnn sweep experiments/kernel_size.py --workdir runs/kernel_size
Question:  VGG (Simonyan & Zisserman 2015) argued for stacks of 3x3 convolutions: two 3x3 layers see a 5x5
           window with 18 instead of 25 weights per channel pair, and add a nonlinearity. A small ResNet (one
           basic block per stage, 8/16/32 channels) on Fashion-MNIST:
           - k3, k5, k7: the same network with bigger kernels (more parameters and a bigger receptive field);
           - k3-deep: 3x3 kernels and two blocks per stage, the receptive field of k5 with fewer parameters;
           - k7-thin: 7x7 kernels at 3/7 of the width, about the parameters of k3.
           `python -m jaxcnn summary resnet20 --set stage_sizes=1,1,1 --set kernel_size=5 --input 28,28,1` shows
           each layer's receptive field.
Runtime:   about 3-4 min on an idle 2-core CPU (10 runs; 290 s of CPU time measured; 5.3 min wall on a busy one).
Expected:  measured 2026-11-26 with jax 0.10.2 on a 2-core x86 CPU (docs/results/kernel_size.md; 2,000 training
           images, 4 epochs of batch 32, 5,000 test images, mean ± sample std of 2 seeds): k3 74.06 ± 0.25% (19,074
           parameters), k5 77.64 ± 0.11% (51,842), k7 77.98 ± 1.10% (100,994), k3-deep 77.04 ± 1.56% (43,490),
           k7-thin 76.39 ± 1.85% (18,997). Everything that widens the receptive field of this shallow net (one block
           per stage) helped: bigger kernels or more 3x3 layers, about equally at equal receptive field (k5 vs
           k3-deep, within the noise); at equal parameters, 7x7 kernels on fewer channels were about 2 points above
           3x3 (with only 2 seeds and a spread of 1.9 points for k7-thin: suggestive, not conclusive).
Full size: --set data.train_limit=none --set data.test_limit=none --set train.eval_every_epochs=1
           --set train.epochs=20.
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here).
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, named, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "resnet20", "stage_sizes": (1, 1, 1), "width": 0.5, "stem_width": 8},
        data=DataConfig(name="fashion_mnist", train_limit=10000, batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        train=TrainConfig(epochs=6, log_every_steps=50, eval_every_epochs=0),
    )


def sweep() -> list[dict]:
    variants = chain(
        named("k3", {"model.kernel_size": 3}),
        named("k5", {"model.kernel_size": 5}),
        named("k7", {"model.kernel_size": 7}),
        named("k3-deep-rf-of-k5", {"model.kernel_size": 3, "model.stage_sizes": (2, 2, 2)}),
        named("k7-thin-params-of-k3", {"model.kernel_size": 7, "model.width": 1.5 / 7, "model.stem_width": 3}),
    )
    return product(variants, seeds(5))
