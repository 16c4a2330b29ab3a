"""Every model BackdoorBench's ``generate_cls_model`` lists: our factory builds it with BackdoorBench's state_dict
layout, the head is found (or refused in one line), and each of the five modes takes a step on it.

Layout: the full-size model is built on the meta device (no memory, no time) and its parameter names and shapes
are compared with those BackdoorBench's own factory gives (``backdoorbench_state_dicts.json``, written by
``backdoorbench_state_dicts.py`` from a BackdoorBench checkout). Steps: on a reduced-width model of the same class,
in the same BackdoorBench form (``_reduced``); GoogLeNet has no width option and steps at full size.
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import convnext, efficientnet, mobilenetv3, resnet

from fst_plugin.core import MODES, TuningConfig, TuningRun, find_head, get_mode, reinit_head
from fst_plugin.errors import ModelError
from fst_plugin.models import build_model
from fst_plugin.models.factory import backdoorbench_form, load_weights
from fst_plugin.models.preact_resnet import PreActResNet
from fst_plugin.models.resnext import ResNeXt
from fst_plugin.models.senet import SENet
from tests.models.backdoorbench_state_dicts import BACKDOORBENCH_MODELS, expected, fingerprint

CLASSES = 10
HEADS = {"preactresnet18": "linear", "senet18": "linear", "resnext29": "linear", "alexnet": "classifier.6",
         "densenet121": "classifier", "densenet161": "classifier", "mobilenet_v2": "classifier.1",
         "mobilenet_v3_large": "classifier.3", "mnasnet1_0": "classifier.1", "efficientnet_b0": "classifier.1",
         "efficientnet_b3": "classifier.1", "convnext_tiny": "classifier.2",
         **{n: "classifier.6" for n in ("vgg11", "vgg16", "vgg19", "vgg19_bn")},
         **{n: "1.heads.head" for n in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")}}
NO_LINEAR_HEAD = {"squeezenet1_0"}
# Inception-v3 needs 75 px inputs, and about 300 px in training (its auxiliary head pools a 17x17 map): no
# BackdoorBench dataset (28-64 px) can train it, and a step at 300 px is minutes of CI time.
NO_STEP = {"inception_v3"} | NO_LINEAR_HEAD


def _full_size_on_meta(name: str) -> nn.Module:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # GoogLeNet / Inception: torchvision's note on their default init
        return build_model(name, CLASSES)


@pytest.mark.parametrize("name", BACKDOORBENCH_MODELS)
def test_the_factory_builds_backdoorbench_state_dict_layout_and_finds_the_head(name: str) -> None:
    model = _full_size_on_meta(name)
    assert fingerprint(model.state_dict()) == expected()[name]
    load_weights(model, nn.DataParallel(model).state_dict(), name)  # saved with DataParallel's "module." prefix
    load_weights(model, dict(model.state_dict()), name)  # a plain dict, without the modules' versions (_metadata)
    if name in NO_LINEAR_HEAD:
        refusal = r"no nn.Linear layer with 10 outputs found in SqueezeNet: its classifier is a convolution \(classifier.1"
        with pytest.raises(ModelError, match=refusal) as err:
            find_head(model, CLASSES)
        assert "\n" not in str(err.value)
    else:
        assert find_head(model, CLASSES).names == [HEADS.get(name, "fc")]


def test_whole_classifier_takes_the_three_linear_layers_of_vgg_and_alexnet() -> None:
    for name in ("vgg11", "vgg16", "vgg19", "vgg19_bn"):
        head = find_head(_full_size_on_meta(name), CLASSES, whole_classifier=True)
        assert head.names == ["classifier.0", "classifier.3", "classifier.6"]
    assert find_head(_full_size_on_meta("alexnet"), CLASSES, whole_classifier=True).names == \
        ["classifier.1", "classifier.4", "classifier.6"]


def _small_classifier(features: int, dropout_first: bool) -> nn.Sequential:
    """VGG's / AlexNet's three-Linear classifier layout (same indices) at width 16."""
    layers: list[nn.Module] = [nn.Linear(features, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 16), nn.ReLU(),
                               nn.Dropout(), nn.Linear(16, CLASSES)]
    if dropout_first:  # AlexNet: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
        layers = [nn.Dropout(), layers[0], layers[1], nn.Dropout(), layers[3], layers[4], layers[6]]
    return nn.Sequential(*layers)


def _reduced(name: str) -> tuple[nn.Module, int]:
    """The class ``build_model(name)`` builds, at reduced width/depth, in the same BackdoorBench form; the input
    size it takes."""
    tv = torchvision.models
    own = {"preactresnet18": lambda: PreActResNet((1, 1), CLASSES, widths=(8, 16)),
           "senet18": lambda: SENet((1, 1), CLASSES, widths=(16, 32)),
           "resnext29": lambda: ResNeXt((1, 1), cardinality=2, bottleneck_width=4, num_classes=CLASSES, stem_width=8)}
    if name in own:
        return own[name](), 32
    if name.startswith("vgg"):
        with torch.device("meta"):  # VGG's own 25088x4096 classifier is not allocated, only replaced
            net = tv.VGG(nn.Sequential(), CLASSES)
        net.features = tv.vgg.make_layers([8, "M", 16, "M"], batch_norm=name.endswith("_bn"))
        net.avgpool, net.classifier = nn.AdaptiveAvgPool2d(1), _small_classifier(16, dropout_first=False)
    elif name == "alexnet":
        net = tv.AlexNet(CLASSES)
        net.avgpool, net.classifier = nn.AdaptiveAvgPool2d(1), _small_classifier(256, dropout_first=True)
        return backdoorbench_form(net, name), 64  # AlexNet's strides need at least 63 px
    elif name.startswith("vit"):
        net = tv.VisionTransformer(224, int(name[-2:]), num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
                                   num_classes=CLASSES)
    elif name.startswith(("resnet", "resnext50", "wide_resnet")):
        block = resnet.BasicBlock if name in ("resnet18", "resnet34") else resnet.Bottleneck
        groups, width = {"resnext50_32x4d": (32, 4), "wide_resnet50_2": (1, 128)}.get(name, (1, 64))
        return backdoorbench_form(resnet.ResNet(block, [1, 1, 1, 1], CLASSES, groups=groups, width_per_group=width),
                                  name), 16  # 64 channels at least: the smallest input keeps the step cheap
    elif name.startswith("densenet"):
        net = tv.DenseNet(growth_rate=8, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=CLASSES)
    elif name == "shufflenet_v2_x1_0":
        net = tv.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 64], CLASSES)
    elif name == "mobilenet_v2":
        net = tv.MobileNetV2(CLASSES, inverted_residual_setting=[[1, 8, 1, 1], [6, 16, 1, 2]])
    elif name == "mobilenet_v3_large":
        blocks = [mobilenetv3.InvertedResidualConfig(8, 3, 8, 8, False, "RE", 1, 1, 1.0),
                  mobilenetv3.InvertedResidualConfig(8, 5, 24, 16, True, "HS", 2, 1, 1.0)]
        net = tv.MobileNetV3(blocks, last_channel=32, num_classes=CLASSES)
    elif name == "mnasnet1_0":
        net = tv.MNASNet(0.25, CLASSES)
    elif name.startswith("efficientnet"):
        blocks = [efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(6, 3, 2, 8, 16, 1)]
        net = tv.EfficientNet(blocks, dropout=0.2, num_classes=CLASSES)
    elif name == "convnext_tiny":
        net = tv.ConvNeXt([convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)], num_classes=CLASSES)
    elif name == "googlenet":  # no width option: the full model, whose auxiliary heads the factory silences
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_model(name, CLASSES), 16
    else:
        raise AssertionError(f"no reduced model for {name}")
    return backdoorbench_form(net, name), 32


def _one_step(model: nn.Module, mode_name: str, size: int, whole_classifier: bool = False) -> None:
    """One optimiser step of ``mode_name``; checks that what the mode trains moved and what it freezes did not."""
    head = find_head(model, CLASSES, whole_classifier=whole_classifier)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    run = TuningRun(model, head, get_mode(mode_name), TuningConfig(epochs=1, lr=0.05, show_progress=False))
    run.restore(None)
    batch = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2]))
    row = run.train_epoch([batch], 0)
    run.finish()
    assert torch.isfinite(torch.tensor(row["train_epoch_loss_avg_over_batch"]))
    head_keys = head.parameter_names()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert head_keys & moved  # trained, or re-initialised (fe-tuning) and projected
    backbone_moved = moved - head_keys
    assert bool(backbone_moved) == get_mode(mode_name).train_backbone, sorted(backbone_moved)[:5]


@pytest.mark.parametrize("name", [n for n in BACKDOORBENCH_MODELS if n not in NO_STEP])
def test_all_five_modes_take_a_step(name: str) -> None:
    model, size = _reduced(name)
    assert type(model) is type(_full_size_on_meta(name))  # noqa: E721 - the same class (or the ViT wrapper)
    if name.startswith("vit"):
        assert type(model[1]) is type(_full_size_on_meta(name)[1])  # noqa: E721
    reinit_head(find_head(model, CLASSES))  # a backdoored head is not zero, as torchvision's ViT starts its head
    start = copy.deepcopy(model.state_dict())  # with its _metadata, which MNASNet requires
    for mode in MODES:
        model.load_state_dict(start)
        _one_step(model, mode, size)


def test_whole_classifier_tunes_all_three_linear_layers_of_vgg() -> None:
    model, size = _reduced("vgg19_bn")
    for mode in ("fst", "lp"):
        _one_step(model, mode, size, whole_classifier=True)


def test_googlenet_returns_plain_logits_while_training() -> None:
    model, _ = _reduced("googlenet")
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, CLASSES)
    assert "aux1.fc2.weight" in model.state_dict()  # the auxiliary heads stay, for BackdoorBench's state_dict


def test_vit_b_16_saved_as_backdoorbench_saves_it_loads_and_runs_on_small_images() -> None:
    """BackdoorBench: torchvision's vit_b_16, ``heads.head`` replaced by a ``num_classes`` Linear, behind
    ``Resize((224, 224))`` in an ``nn.Sequential``; the attack saves ``model.state_dict()`` (keys ``1.…``)."""
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
        vit.heads.head = nn.Linear(vit.heads.head.in_features, CLASSES)
        theirs = nn.Sequential(torchvision.transforms.Resize((224, 224)), vit)
    theirs = theirs.to_empty(device="cpu")
    with torch.no_grad():
        for i, tensor in enumerate(theirs.state_dict().values()):
            tensor.copy_(torch.linspace(-0.02, 0.02, tensor.numel()).view_as(tensor) * (1 + i % 3))
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert next(iter(saved)).startswith("1.")
    ours = build_model("vit_b_16", CLASSES)
    load_weights(ours, saved, "vit_b_16")
    assert all(torch.equal(v, saved[k]) for k, v in ours.state_dict().items())
    assert find_head(ours, CLASSES).names == ["1.heads.head"]
    with torch.no_grad():
        assert ours.eval()(torch.rand(1, 3, 32, 32)).shape == (1, CLASSES)
