"""The model summary against numbers worked out by hand: parameter counts, the FLOP formula, the receptive-field
recurrence, and XLA's own count of the compiled forward pass."""

from __future__ import annotations

import flax.linen as nn
import pytest

from jaxcnn.analysis.summary import flops_from_cost_analysis, summary
from jaxcnn.models import create_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import ConvNormAct, InceptionBlock


class OneConv(nn.Module):
    features: int = 32
    padding: str = "same"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        return layers.Conv2d(self.features, 3, padding=self.padding, use_bias=self.use_bias, name="conv")(x)


class DenseToSameSize(nn.Module):
    """Flattened 28x28x1 image to as many units as a 3x3x32 'same' conv outputs (28 x 28 x 32)."""

    @nn.compact
    def __call__(self, x):
        return layers.Dense(28 * 28 * 32, name="dense")(x.reshape(x.shape[0], -1))


def rf_chain(layers_ks):
    """The textbook recurrence, one (kernel, stride) at a time: r += (k - 1) * j; j *= s."""
    r, j, out = 1, 1, []
    for k, s in layers_ks:
        r, j = r + (k - 1) * j, j * s
        out.append((r, j))
    return out


def test_lenet5_rows_totals_and_receptive_fields():
    table = summary(create_model("lenet5"), (1, 28, 28, 1))
    assert table.total_params == 61_706 == sum(r.params for r in table.rows)
    assert table.total_state == 0
    assert [r.path for r in table.rows] == [
        "block1_conv", "block1_pool", "block2_conv", "block2_pool", "head/fc1", "head/fc2", "head/logits"]
    assert [r.output_shape for r in table.rows] == [
        (1, 28, 28, 6), (1, 14, 14, 6), (1, 10, 10, 16), (1, 5, 5, 16), (1, 120), (1, 84), (1, 10)]
    # 28x28 is zero-padded to 32x32 first, which moves the grid but does not widen the fields.
    expected = rf_chain([(5, 1), (2, 2), (5, 1), (2, 2)])
    assert [(r.rf_size[0], r.rf_jump[0]) for r in table.rows[:4]] == expected == [(5, 1), (6, 2), (14, 2), (16, 4)]
    assert all(r.rf_size is None for r in table.rows[4:])
    # 2 x MACs: conv1 28*28*6*25, conv2 10*10*16*150, then the dense layers.
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert table.total_flops == 2 * macs == table.total_flops_unpadded  # valid convs have no padding taps
    assert 0.97 < table.xla_ratio < 1.05
    text, markdown = str(table), table.to_markdown()
    assert "block2_conv" in text and "61,706" in text and "XLA" in text
    assert markdown.startswith("| layer | type |") and markdown.count("\n| ") == len(table.rows)


def test_single_conv_flops_equal_the_formula_and_xla():
    valid = summary(OneConv(32, "valid", use_bias=False), (1, 28, 28, 16))
    assert valid.total_flops == valid.total_flops_unpadded == 2 * 26 * 26 * 32 * 3 * 3 * 16
    assert valid.xla_flops == pytest.approx(valid.total_flops, rel=0.02)
    same = summary(OneConv(32, "same", use_bias=False), (1, 28, 28, 16))
    assert same.total_flops == 2 * 28 * 28 * 32 * 3 * 3 * 16
    # Without padding taps: along each axis 28 outputs x 3 taps, minus the one tap off each edge.
    assert same.total_flops_unpadded == 2 * (28 * 3 - 2) ** 2 * 16 * 32
    assert same.xla_flops == pytest.approx(same.total_flops_unpadded, rel=0.02)


def test_a_conv_needs_orders_of_magnitude_fewer_parameters_than_a_dense_layer():
    conv = summary(OneConv(), (1, 28, 28, 1), xla=False)
    dense = summary(DenseToSameSize(), (1, 28, 28, 1), xla=False)
    assert conv.rows[0].output_shape == (1, 28, 28, 32) and dense.rows[0].output_shape == (1, 28 * 28 * 32)
    assert conv.total_params == 3 * 3 * 1 * 32 + 32 == 320
    assert dense.total_params == 784 * 25_088 + 25_088 == 19_694_080
    assert dense.total_params / conv.total_params == pytest.approx(61_544)  # weight sharing: > 10^4 times fewer


def test_resnet20_totals_and_receptive_field_through_the_blocks():
    table = summary(create_model("resnet20"), (32, 32, 3), batch_size=2)
    assert table.input_shape == (2, 32, 32, 3) and table.output_shape == (2, 10)
    assert table.total_params == 269_722 == sum(r.params for r in table.rows)
    assert table.total_state == 2 * (16 * 7 + 32 * 6 + 64 * 6)  # running mean and var of 19 BatchNorms
    convs = [r for r in table.rows if r.type == "Conv2d"]
    assert len(convs) == 19  # option-A shortcuts have no conv
    # Main path: stem conv, then per stage 6 convs, the first of stages 2 and 3 at stride 2.
    ks = [(3, 1)] + [(3, 2 if (i in (6, 12)) else 1) for i in range(18)]
    assert [(c.rf_size[0], c.rf_jump[0]) for c in convs] == rf_chain(ks)
    assert convs[-1].rf_size == (81, 81)
    assert 0.98 < table.xla_ratio < 1.1


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_vgg_receptive_field_counts_each_stage_pool(name):
    # A stage's 2x2 pool ends its last block: a Pool2d row without BatchNorm, inside the BatchNorm's call with it.
    model = create_model(name, num_classes=10, width=0.125, head_pool_size=None, head_hidden=())
    table = summary(model, (32, 32, 3), xla=False)
    pools = [r for r in table.rows if r.output_shape[1:3] != () and r.rf_size is not None and r.type != "Conv2d"]
    assert [r.output_shape[1] for r in pools] == [16, 8, 4, 2, 1]
    assert {r.type for r in pools} == ({"BatchNorm"} if name.endswith("_bn") else {"Pool2d"})
    chain = []
    for size in (1, 1, 2, 2, 2):  # VGG-11: convs per stage, each stage then a 2x2 stride-2 pool
        chain += [(3, 1)] * size + [(2, 2)]
    windowed = [r for r in table.rows if r.rf_size is not None]
    assert [(r.rf_size[0], r.rf_jump[0]) for r in windowed] == rf_chain(chain)
    assert windowed[-1].rf_size == (150, 150) and windowed[-1].rf_jump == (32, 32)


def test_inception_branches_each_get_their_own_receptive_field():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = layers.Conv2d(8, 3, name="stem")(x)  # RF 3
            cb = lambda *a, **k: ConvNormAct(*a, conv=layers.Conv2d, **k)
            return InceptionBlock(2, 3, 4, 1, 2, 3, kernel5=5, conv_block=cb, name="inc")(x)

    rows = {r.path: r for r in summary(Tiny(), (1, 9, 9, 3), xla=False).rows}
    rf = {path.removeprefix("inc/").removesuffix("/conv"): row.rf_size[0] for path, row in rows.items()}
    assert rf == {"stem": 3, "branch1": 3, "branch2_reduce": 3, "branch2": 5, "branch3_reduce": 3, "branch3": 7,
                  "branch4_pool": 5, "branch4": 5}


def test_cost_analysis_forms_and_bad_shapes():
    assert flops_from_cost_analysis({"flops": 12.0}) == 12.0
    assert flops_from_cost_analysis([{"flops": 7.0, "bytes accessed": 3.0}]) == 7.0
    assert flops_from_cost_analysis([]) is None and flops_from_cost_analysis(None) is None
    assert flops_from_cost_analysis({"bytes accessed": 1.0}) is None
    with pytest.raises(ValueError, match=r"\(N, H, W, C\) or \(H, W, C\)"):
        summary(create_model("lenet5"), (28, 28))
