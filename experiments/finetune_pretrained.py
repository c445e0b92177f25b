"""Fine-tuning an ImageNet ResNet-18 on Fashion-MNIST: frozen backbone, full fine-tuning, or from scratch.

Command:   python -m jaxcnn sweep experiments/finetune_pretrained.py --workdir runs/finetune_pretrained
           The weights: $FINETUNE_WEIGHTS, a spec (docs/pretrained.md), default hf-hub:timm/resnet18.a1_in1k
           (downloaded into the Hugging Face cache when online); e.g. FINETUNE_WEIGHTS=torchvision:resnet18=/path/
           resnet18-f37072fd.pth or timm:resnet18=/path/model.safetensors. (`--set transfer.init_from=SPEC` works
           too, but then the sweep leaves out the scratch variant, which sets it.)
Question:  how much does starting from ImageNet weights help a small labelled set of another domain, and does the
           backbone need to train? torchvision's ResNet-18 layout (``resnet18_from_gray``: jaxcnn's ``resnet18`` with
           the grey 28x28 images upsampled to ``model.input_size`` (32) and repeated to 3 channels inside the
           model, so the pretrained stem applies unchanged) is trained on the first 2,000 Fashion-MNIST training
           images for 150 steps of 64 with SGD + momentum, cosine schedule, started three ways:
             frozen     pretrained; every conv and BatchNorm (`transfer.freeze=^stem,^stage`, running statistics
                        included) frozen: only the new 10-class head trains (a linear probe);
             finetune   pretrained; everything trains (the 1000-class head is replaced by a fresh 10-class one);
             scratch    jaxcnn's random initialisation, everything trains.
           Test accuracy on the first 2,000 Fashion-MNIST test images. Larger budgets: --set data.train_limit=none
           --set train.steps=3000 --set model.input_size=64 (16x the compute per step of 32 px at 64).
Runtime:   measured 2026-12-06, Python 3.11, jax 0.10.2, 2-core Intel Xeon shared with other jobs (load average
           about 8): see docs/results/finetune_pretrained.md for the three runs' wall times.
Expected:  NOT measured with ImageNet weights here: this machine has no network, so no ImageNet weights. The run on
           record (docs/results/finetune_pretrained.md) used a torchvision ResNet-18 with *random* weights saved to a
           file (`torch.manual_seed(0); torch.save(torchvision.models.resnet18().state_dict(), "r18_random.pth")`,
           torchvision 0.28.0, default initialisation) as FINETUNE_WEIGHTS=torchvision:resnet18=r18_random.pth: it checks the
           whole path (import, head re-initialisation, freezing) but says nothing about ImageNet features: there,
           the frozen random backbone is a random-features baseline and finetune is training from torchvision's
           initialisation. Its figures are in docs/results/finetune_pretrained.md; with real ImageNet weights rerun
           the command above.
Data:      Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), or
           --set data.data_dir=FOLDER.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig, TransferConfig
from jaxcnn.models import list_models, register_model
from jaxcnn.models.resnet import ResNet
from jaxcnn.results.sweep import chain, named

MODEL = "resnet18_from_gray"
WEIGHTS = os.environ.get("FINETUNE_WEIGHTS", "hf-hub:timm/resnet18.a1_in1k")  # the config that ran is saved


class ResNetFromGray(ResNet):
    """A ResNet that takes grey ``[N, H, W, 1]`` (or RGB) images, resizes them to ``input_size`` squared
    (bilinear) and repeats the grey channel to RGB: an ImageNet-pretrained stem then applies unchanged."""

    input_size: int = 32

    def prepare_input(self, x: jax.Array) -> jax.Array:
        x = super().prepare_input(x)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if x.shape[1:3] != (self.input_size, self.input_size):
            x = jax.image.resize(x, (x.shape[0], self.input_size, self.input_size, x.shape[3]), "bilinear")
        return x


if MODEL not in list_models():  # this file may be imported more than once (as a script and as an experiment)
    register_model(
        MODEL,
        ResNetFromGray,
        description="torchvision's ResNet-18 layout on grey images resized to input_size and repeated to RGB",
        num_classes=10, stem="imagenet", stem_width=64, stage_widths=(64, 128, 256, 512), shortcut="B",
        stage_sizes=(2, 2, 2, 2),
    )


def get_config() -> Config:
    return Config(
        model={"name": MODEL, "input_size": 32},
        data=DataConfig(name="fashion_mnist", train_limit=2000, test_limit=2000, batch_size=64, eval_batch_size=500),
        optim=OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=5e-5),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.2),
        train=TrainConfig(steps=150, log_every_steps=50, eval_every_epochs=0, progress=False),
        transfer=TransferConfig(init_from=WEIGHTS),
    )


def sweep() -> list[dict]:
    return chain(
        named("frozen", {"transfer.freeze": ("^stem", "^stage")}),
        named("finetune", {}),
        named("scratch", {"transfer.init_from": None}),
    )
