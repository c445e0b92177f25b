"""Fine-tuning an ImageNet ResNet-18 on Fashion-MNIST: frozen backbone, full fine-tuning, or from scratch.

Command:   python -m jaxcnn sweep experiments/finetune_pretrained.py --workdir runs/finetune_pretrained
           The weights: $FINETUNE_WEIGHTS, a spec (docs/pretrained.md), default hf-hub:timm/resnet18.a1_in1k
           (downloaded into the Hugging Face cache when online); e.g. FINETUNE_WEIGHTS=torchvision:resnet18=/path/
           resnet18-f37072fd.pth or timm:resnet18=/path/model.safetensors. (`--set transfer.init_from=SPEC` works
           too, but then the sweep leaves out the scratch variant, which sets it.)
Question:  how much does starting from pretrained weights help a small labelled set of another domain, and does the
           backbone need to train? torchvision's ResNet-18 layout (``resnet18_from_gray``: jaxcnn's ``resnet18`` with
           the grey 28x28 images upsampled to ``model.input_size`` (32) and repeated to 3 channels inside the
           model, so a pretrained RGB stem applies unchanged) is trained on the first 2,000 Fashion-MNIST training
           images for 150 steps of 64 with SGD + momentum, cosine schedule, started four ways (3 seeds each):
             frozen             pretrained; every conv and BatchNorm frozen (`transfer.freeze=^stem,^stage`), the
                                BatchNorms in inference mode (`model.bn_eval`): only the head trains (a linear probe);
             frozen-batchstats  the same freeze with jaxcnn's default BatchNorm: training batches are normalised
                                with their own statistics, evaluation with the running ones;
             finetune           pretrained; everything trains;
             scratch            jaxcnn's random initialisation, everything trains.
           Test accuracy on the first 2,000 Fashion-MNIST test images. Larger budgets: --set data.train_limit=none
           --set train.steps=3000 --set model.input_size=64 (4x the compute per step).
Runtime:   measured 2026-12-06 (jax 0.10.2, Python 3.11, 2-core Intel Xeon shared with other jobs): 12 runs in 25 min
           wall, 949 s of CPU time; 60-240 s per run.
Expected:  NOT measured with ImageNet weights: this machine has no network. The run on record
           (docs/results/finetune_pretrained.md) started from a torchvision ResNet-18 trained in PyTorch on MNIST
           digits for 300 steps (`python experiments/finetune_pretrained.py --pretrain-pytorch r18_mnist.pth`:
           97.94% on MNIST's test set, the same 97.94% imported into jaxcnn; its 10-class digit head is loaded too),
           with FINETUNE_WEIGHTS=torchvision:resnet18=r18_mnist.pth. Test accuracy, mean ± sample std of 3 seeds:
             frozen 68.82 ± 0.20%, frozen-batchstats 30.08 ± 1.46%, finetune 78.40 ± 0.75%, scratch 83.17 ± 0.10%.
           Digit features do not help on clothes (scratch wins by 4.8 points); a frozen backbone needs its
           BatchNorms in inference mode (39 points lost without). With ImageNet weights, rerun the command above.
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
from jaxcnn.results.sweep import chain, named, product, seeds

MODEL = "resnet18_from_gray"
WEIGHTS = os.environ.get("FINETUNE_WEIGHTS", "hf-hub:timm/resnet18.a1_in1k")  # the config that ran is saved


class ResNetFromGray(ResNet):
    """A ResNet that takes grey ``[N, H, W, 1]`` (or RGB) images, resizes them to ``input_size`` squared
    (bilinear) and repeats the grey channel to RGB: an ImageNet-pretrained stem then applies unchanged.

    ``bn_eval=True``: every BatchNorm normalises with its running statistics in training too, and keeps them (a
    frozen backbone as timm's ``FrozenBatchNorm2d`` or PyTorch's ``backbone.eval()`` has it). Without it, a frozen
    BatchNorm keeps its statistics but normalises each training batch with the batch's own: the head then learns
    on features that evaluation, which uses the running statistics, does not produce."""

    input_size: int = 32
    bn_eval: bool = False

    def norm_def(self, train: bool):
        return super().norm_def(train and not self.bn_eval)

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
    variants = chain(
        named("frozen", {"transfer.freeze": ("^stem", "^stage"), "model.bn_eval": True}),
        named("frozen-batchstats", {"transfer.freeze": ("^stem", "^stage")}),
        named("finetune", {}),
        named("scratch", {"transfer.init_from": None}),
    )
    return product(variants, seeds(3))


# ---------------------------------------------------------------------------------------------------------
# Offline stand-in for ImageNet weights: a torchvision ResNet-18 trained briefly on MNIST digits in PyTorch
# ---------------------------------------------------------------------------------------------------------


def pretrain_in_pytorch(path: str, *, steps: int = 300, batch_size: int = 64, size: int = 32, seed: int = 0,
                        data_dir: str | None = None, threads: int = 1) -> float:
    """Trains torchvision's resnet18 (10 classes) on MNIST digits in PyTorch, resized to `size` and repeated to RGB
    as `ResNetFromGray` does, normalised with MNIST's mean and std; saves its state dict (`torch.save`) to `path`
    and returns its accuracy on the 10,000 MNIST test images. Needs torch and torchvision."""
    import sys
    import types

    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    from jaxcnn.data import dataset_info, load_split

    torch.manual_seed(seed)
    # One thread: on the shared 2-core machine two OpenMP threads spun, 5 s per step against 0.4 s with one.
    torch.set_num_threads(threads)
    info = dataset_info("mnist")
    mean, std = info.mean[0], info.std[0]

    def batch(images: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(images).float().permute(0, 3, 1, 2) - mean) / std
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    train, test = (load_split("mnist", split, data_dir=data_dir) for split in ("train", "test"))
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(train), batch_size)
        loss = F.cross_entropy(model(batch(train.images[idx])), torch.from_numpy(train.labels[idx]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(batch(test.images[i:i + 500])).argmax(1).numpy() == test.labels[i:i + 500]).sum())
                      for i in range(0, len(test), 500))
    torch.save(model.state_dict(), path)
    return correct / len(test)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="make the offline stand-in weights (see the module docstring)")
    parser.add_argument("--pretrain-pytorch", metavar="PATH", required=True, help="where to save the .pth file")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    accuracy = pretrain_in_pytorch(args.pretrain_pytorch, steps=args.steps)
    print(f"saved {args.pretrain_pytorch}: torchvision resnet18 after {args.steps} steps on MNIST, test accuracy "
          f"{100 * accuracy:.2f}%; use FINETUNE_WEIGHTS=torchvision:resnet18={args.pretrain_pytorch}")
