"""CIFAR-10 ResNet-20/56/110 with He et al.'s recipe (Deep Residual Learning, 2016, Sec. 4.2).

Command:   python -m jaxcnn sweep experiments/cifar10_resnet_he.py --workdir runs/cifar10_resnet_he
           (needs CIFAR-10: put cifar-10-binary.tar.gz or cifar-10-python.tar.gz in ~/.cache/jaxcnn/cifar10 or
           give --set data.data_dir=FOLDER; see jaxcnn.data.sources)
Question:  does this codebase reproduce the paper's CIFAR ResNets? The recipe: SGD, momentum 0.9, weight decay
           1e-4 (L2 on every parameter), batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, 64k
           iterations in all (164 epochs); 4-pixel zero padding + random 32x32 crops and horizontal flips;
           option-A (parameter-free) shortcuts. ResNet-110 starts at lr 0.01 in the paper until the training
           error is below 80% (about 400 iterations); here a one-epoch linear warm-up plays that part.
           Per-channel normalisation stands in for the paper's per-pixel mean subtraction.
Runtime:   not measured: no CIFAR-10 copy and no accelerator on the 2-core machine this suite is measured on.
           Estimate on a 2-core Intel Xeon at the 540-770 images/s jaxcnn trains ResNet-20 at batch 128
           (benchmarks/README.md): 64k x 128 images is about 3-4 hours for ResNet-20 and about 2.7x / 5.4x that for
           ResNet-56 / ResNet-110. Use a GPU.
Expected:  from the literature, NOT measured here: test accuracy 91.25% (ResNet-20), 93.03% (ResNet-56) and
           93.57% (ResNet-110, the best of 5 runs; mean 93.39 ± 0.16) — He et al. 2016, Table 6 (errors 8.75 /
           6.97 / 6.43%, 6.61 ± 0.16 mean for ResNet-110). Parameter counts: 0.27M / 0.85M / 1.7M.
Variants:  --set model.name=resnet56 runs one of them; add seeds with a product(..., seeds(n)) of your own.
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, named

STEPS_PER_EPOCH = 50000 // 128  # 390: the loop drops the last partial batch of an epoch


def get_config() -> Config:
    return Config(
        model={"name": "resnet20"},
        data=DataConfig(name="cifar10", batch_size=128, eval_batch_size=1000, crop_padding=4, flip="random"),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, weight_decay_mask="all"),
        schedule=ScheduleConfig(name="step", decay_epochs=(32000 / STEPS_PER_EPOCH, 48000 / STEPS_PER_EPOCH),
                                decay_factor=0.1),
        train=TrainConfig(steps=64000, log_every_steps=100, eval_every_epochs=5),
    )


def sweep() -> list[dict]:
    return chain(
        named("resnet20", {"model.name": "resnet20"}),
        named("resnet56", {"model.name": "resnet56"}),
        named("resnet110", {"model.name": "resnet110", "schedule.warmup_epochs": 1.0}),
    )
