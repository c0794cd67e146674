"""The vision examples' code paths on tiny models: ViT and SegFormer (transformers, built from configs) checked
against PEFT itself, and EfficientNet's "same"-padding convs (efficientnet-lite-pytorch, a tiny config) checked
against dense float64 maths. The examples' own helpers (data, metrics, training loops) are imported and run small."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import lorakit_and_peft, load_example



def assert_same_grads(ours, theirs):
    """Both models are PEFT-named the same way (lorakit follows PEFT's attribute names): compare every gradient."""
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for name in got:
        assert got[name] is not None and got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], msg=name)


# ---------------------------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------------------------
def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=5)
    return ViTForImageClassification(config).eval()


def test_vit_outputs_and_gradients_match_peft():
    ours, theirs = lorakit_and_peft(tiny_vit(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     modules_to_save=["classifier"], init_lora_weights=False))
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 4])
    out, ref = ours(pixel_values=pixels, labels=labels), theirs(pixel_values=pixels, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    with ours.disable_adapter():
        base = ours(pixel_values=pixels).logits
    assert (out.logits - base).abs().max() > 1e-3  # the adapter (and the head copy) really change the outputs
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(ours, theirs)


def test_vit_adapter_saved_by_lorakit_loads_in_peft(tmp_path):
    import peft

    base = tiny_vit()
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
        init_lora_weights=False))
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(pixel_values=pixels).logits, theirs(pixel_values=pixels).logits)


# ---------------------------------------------------------------------------------------------------------------
# SegFormer
# ---------------------------------------------------------------------------------------------------------------
def test_segformer_example_config_matches_peft():
    seg = load_example("segmentation")
    base = seg.segformer().eval()
    config = seg.lora_config(r=4)
    ours, theirs = lorakit_and_peft(base, dict(r=config.r, lora_alpha=config.lora_alpha, target_modules=seg.TARGETS,
                                               modules_to_save=["decode_head"], init_lora_weights=False))
    wrapped = [n for n, _ in ours.base_model.lora_layers()]
    assert len(wrapped) == 4 * len(seg.TARGETS)  # one block per stage, every projection of it
    images, labels = seg.make_shapes(2, size=32, seed=5)
    out, ref = seg.pixel_logits(ours, images), seg.pixel_logits(theirs, images)
    torch.testing.assert_close(out, ref)
    F.cross_entropy(out, labels).backward()
    F.cross_entropy(ref, labels).backward()
    assert_same_grads(ours, theirs)


def test_segformer_adapter_with_batchnorm_head_round_trips(tmp_path):
    """The decode head (in modules_to_save) holds a BatchNorm, whose num_batches_tracked buffer is an int64 tensor
    in the adapter file: lorakit and PEFT both load it back."""
    import peft

    seg = load_example("segmentation")
    base = seg.segformer().eval()
    fresh = copy.deepcopy(base)
    model = lorakit.get_peft_model(base, seg.lora_config(r=4))
    images, labels = seg.make_shapes(4, size=32, seed=6)
    seg.train(model, images, labels, steps=2, lr=1e-2, batch=4)  # moves the head's batch-norm statistics
    head = model.get_base_model().decode_head.modules_to_save["default"]
    assert head.batch_norm.num_batches_tracked.item() == 2
    model.save_pretrained(tmp_path)
    expected = seg.pixel_logits(model, images)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path).eval()
    for other in (ours, theirs):
        torch.testing.assert_close(seg.pixel_logits(other, images), expected)
    reloaded_head = ours.get_base_model().decode_head.modules_to_save["default"]
    assert torch.equal(reloaded_head.batch_norm.running_mean, head.batch_norm.running_mean)
    assert reloaded_head.batch_norm.num_batches_tracked.item() == 2


def test_mean_iou_matches_scikit_learn():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install 'lorakit[vision]')")
    from sklearn.metrics import jaccard_score

    seg = load_example("segmentation")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 9, 9), generator=g)
    noise = torch.randint(0, 3, target.shape, generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target, noise)
    miou, per_class = seg.mean_iou(pred, target)
    want = jaccard_score(target.flatten().numpy(), pred.flatten().numpy(), labels=[0, 1, 2], average=None)
    assert per_class == pytest.approx(list(want), abs=1e-12)
    assert miou == pytest.approx(want.mean(), abs=1e-12)
    # a class in neither prediction nor labels is left out of the mean (and reported as NaN), not counted as 0
    target2, pred2 = target.clamp(max=1), pred.clamp(max=1)
    miou2, per_class2 = seg.mean_iou(pred2, target2)
    want2 = jaccard_score(target2.flatten().numpy(), pred2.flatten().numpy(), labels=[0, 1], average=None)
    assert per_class2[2] != per_class2[2] and miou2 == pytest.approx(want2.mean(), abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        seg.mean_iou(pred[:1], target)


def test_make_shapes_labels_follow_the_pixels():
    seg = load_example("segmentation")
    images, labels = seg.make_shapes(6, size=24, style="dark", seed=3)
    assert images.shape == (6, 3, 24, 24) and labels.shape == (6, 24, 24)
    assert set(labels.unique().tolist()) <= {0, 1, 2} and (labels > 0).flatten(1).any(1).all()
    brightest = images.amax(1)  # dark style: every shape pixel has a channel ≥ 0.6, the background none above 0.3
    assert brightest[labels > 0].min() >= 0.6 and brightest[labels == 0].max() <= 0.3
    again = seg.make_shapes(6, size=24, style="dark", seed=3)
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    assert seg.make_shapes(2, size=24, style="light", seed=3)[0].shape == (2, 3, 24, 24)
    with pytest.raises(ValueError, match="style"):
        seg.make_shapes(1, style="sepia")


def test_segmentation_training_path_leaves_the_base_intact():
    seg = load_example("segmentation")
    common = load_example("common")
    base = seg.segformer().eval()
    images, labels = seg.make_shapes(8, size=32, style="light", seed=7)
    before = seg.pixel_logits(base, images).detach()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = lorakit.get_peft_model(base, seg.lora_config(r=4))
    first = F.cross_entropy(seg.pixel_logits(model, images), labels).item()
    seg.train(model, images, labels, steps=25, lr=3e-3, batch=8)
    assert F.cross_entropy(seg.pixel_logits(model, images), labels).item() < first
    assert not model.training  # train() hands the model back in eval mode
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(seg.pixel_logits(model, images), before, rtol=0, atol=0)
    base_now = model.get_base_model()
    for name, layer in model.base_model.lora_layers():  # the frozen weights never moved
        assert torch.equal(layer.base_layer.weight, frozen[f"{name}.weight"])
    assert torch.equal(base_now.decode_head.original_module.classifier.weight, frozen["decode_head.classifier.weight"])
    assert common.check_merge(model, lambda m: seg.pixel_logits(m, images)) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite: Conv2dStaticSamePadding
# ---------------------------------------------------------------------------------------------------------------
def tiny_efficientnet():
    eff = pytest.importorskip("efficientnet_lite_pytorch",
                              reason="efficientnet-lite-pytorch is not installed (pip install 'lorakit[vision]')")
    torch.manual_seed(0)
    model = eff.EfficientNet.from_name("efficientnet-lite0", image_size=32, num_classes=4, width_coefficient=0.25,
                                       depth_coefficient=0.25)
    # Calibrate batch-norm on random images (as pretraining would): with its initial statistics the random network's
    # activations die out and every input gives the same logits.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
    return model.eval()


def test_efficientnet_lora_equals_dense_float64_reference():
    ic = load_example("image_classification")
    base = tiny_efficientnet().double()
    stem = base._conv_stem
    assert type(stem).__name__ == "Conv2dStaticSamePadding"
    assert stem.kernel_size == (3, 3) and tuple(stem.stride) == (2, 2)
    assert stem.static_padding.padding == (0, 1, 0, 1)  # asymmetric "same" padding, applied in its own forward
    reference = copy.deepcopy(base)
    model = lorakit.get_peft_model(base, ic.lora_config(r=4))
    layers = dict(model.base_model.lora_layers())
    assert "_conv_stem" in layers and not any("_depthwise_conv" in n for n in layers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():  # a non-zero update everywhere
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1)
        for name, layer in layers.items():  # reference: W + s·B@A written into a plain copy of each conv
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = layer.scaling["default"] * (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], *A.shape[1:])
            reference.get_submodule(name).weight.add_(delta)
        reference._fc.load_state_dict(model.get_base_model()._fc.modules_to_save["default"].state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    out = model(x)
    with model.disable_adapter():
        assert (out - model(x)).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(x), rtol=1e-10, atol=1e-10)


def test_peft_cannot_wrap_the_same_padding_conv():
    """What the README says of PEFT 0.21.2: it rebuilds the conv's own class for its LoRA factors, and
    Conv2dStaticSamePadding's constructor refuses (it needs an image size); lorakit wraps it."""
    import peft

    base = tiny_efficientnet()
    with pytest.raises(AssertionError):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["_conv_stem"]))
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["_conv_stem"]))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_efficientnet_training_path_keeps_batchnorm_frozen():
    ic = load_example("image_classification")
    common = load_example("common")
    base = tiny_efficientnet()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = lorakit.get_peft_model(base, ic.lora_config(r=4))
    model.eval()  # as the example: batch-norm keeps its statistics
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 4, (24,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = [ic.train_epoch(model, x, y, opt, batch=8, seed=e) for e in range(4)]
    assert losses[-1] < losses[0]
    state = model.get_base_model().state_dict()
    for key, value in frozen.items():  # running statistics and every base weight unchanged
        own = key if key in state else key.replace(".weight", ".base_layer.weight")
        if key.startswith("_fc."):
            own = key.replace("_fc.", "_fc.original_module.")
        assert torch.equal(state[own], value), key
    assert common.check_merge(model, lambda m: m(x[:4])) < 1e-4


def test_digits_loader():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install 'lorakit[vision]')")
    ic = load_example("image_classification")
    x_train, y_train, x_test, y_test = ic.digits(size=16)
    assert x_train.shape == (1257, 3, 16, 16) and x_test.shape == (540, 3, 16, 16)
    per_class = torch.bincount(torch.cat([y_train, y_test]))
    assert ((torch.bincount(y_test) - 0.3 * per_class).abs() <= 1).all()  # stratified
    # undo the normalisation: grey images (three equal channels) in [0, 1]
    raw = x_test * torch.tensor(ic.IMAGENET_STD)[:, None, None] + torch.tensor(ic.IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(raw[:, 0], raw[:, 2])
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.equal(ic.digits(size=16)[3], y_test)
