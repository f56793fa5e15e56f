import pytest
import torch

from fmnist_sweep.config import compose, group_options
from fmnist_sweep.models import count_params
from hydra.utils import instantiate

# (Keras-convention total, PyTorch parameters().numel()) for the seed studies' models.
# Keras counts BatchNorm moving mean/variance in "Total params" and one bias per
# recurrent gate; PyTorch keeps BN statistics as buffers and two biases (b_ih, b_hh).
PUBLISHED = {
    "cnn": (306_906, 306_906 - 2 * (32 + 32 + 64 + 64 + 128 + 128 + 16)),
    "rnn": (135_498, 135_498 - 2 * 64 + (256 + 128 + 64)),
    "bilstm": (1_340_042, 1_340_042 + 2 * 4 * (256 + 128)),
}


@pytest.mark.parametrize("name", group_options("model"))
def test_every_model_composes_and_maps_images(name):
    cfg = compose([f"model={name}"])
    model = instantiate(cfg.model)
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    out, loss = model(x, y)
    if model.task == "classify":
        assert out.shape == (5, 10)
    else:
        assert model.task == "reconstruct" and out.shape == x.shape
        assert 0 <= out.min() and out.max() <= 1  # sigmoid output
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_seed_models_match_published_parameter_counts(name):
    model = instantiate(compose([f"model={name}"]).model)
    keras, torch_count = PUBLISHED[name]
    assert count_params(model, "keras") == keras
    assert count_params(model) == torch_count


@pytest.mark.parametrize("n", [16, 64, 784])
def test_autoencoder_latent_size_is_the_bottleneck(n):
    model = instantiate(compose(["model=autoencoder", f"model.latent_dim={n}"]).model)
    assert model.encoder(torch.rand(3, 1, 28, 28)).shape == (3, n)


def test_relu_output_and_cnn_activation_options():
    ae = instantiate(compose(["model=autoencoder", "model.output_activation=relu"]).model)
    assert isinstance(ae.decoder[-1], torch.nn.ReLU)
    cnn = instantiate(compose(["model=cnn", "model.activation=relu", "model.widths=[16,32]",
                               "model.dropouts=[0.1,0.2]"]).model)
    assert cnn(torch.rand(2, 1, 28, 28))[0].shape == (2, 10)


def test_frozen_encoder_gets_no_gradient_and_keeps_dropout_off(tmp_path):
    ae = instantiate(compose(["model=autoencoder"]).model)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    scratch = instantiate(compose(["model=encoder_classifier", "model.freeze=true"]).model)
    assert all(p.requires_grad for p in scratch.encoder.parameters())  # nothing to freeze
    model = instantiate(compose(["model=encoder_classifier", "model.freeze=true",
                                 f"model.pretrained={tmp_path / 'ae.pt'}"]).model)
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.parameters(), ae.encoder.parameters()))
    model.train()
    assert not model.encoder.training and model.head.training
    _, loss = model(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("name", group_options("optimizer"))
def test_every_optimizer_builds_on_model_parameters(name):
    cfg = compose([f"optimizer={name}"])
    model = instantiate(cfg.model)
    opt = instantiate(cfg.optimizer)(model.parameters())
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    _, loss = model(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", group_options("tracking"))
def test_every_tracking_option_composes(name, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    cfg = compose([f"tracking={name}"])
    expected = {"local": "sqlite:///", "server": "http://127.0.0.1:5999"}[name]
    assert cfg.tracking.uri.startswith(expected)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_drops_p_scales_the_rest_and_passes_the_same_gradient(p):
    """The CPU fast mask: the fraction dropped is p (1,000,000 draws: 5 sigma < 0.0025),
    kept values are scaled by 1/(1-p), the gradient is the same mask times the same
    scale, the layout of a channels_last input is kept, eval mode is the identity, and
    torch.manual_seed makes it repeatable."""
    from fmnist_sweep.models import Dropout

    d = Dropout(p)
    x = torch.ones(100, 10, 10, 100, requires_grad=True)
    torch.manual_seed(0)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.0025
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, (y != 0) * torch.tensor(2 / (1 - p)))
    torch.manual_seed(0)
    assert torch.equal(d(x), y)
    assert not torch.equal(d(x), y)  # a fresh mask each call
    # neighbouring elements are independent: no pattern from sharing one 64-bit draw
    keep = (y != 0).flatten()[: 400_000].view(-1, 4).float()
    assert abs(keep.prod(1).mean().item() - (1 - p) ** 4) < 0.005
    cl = torch.randn(8, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    assert d(cl).is_contiguous(memory_format=torch.channels_last)
    half = d(torch.ones(1000, 1000, dtype=torch.bfloat16))  # bf16 (autocast's) mask: same values
    assert half.dtype == torch.bfloat16 and abs((half == 0).float().mean().item() - p) < 0.0025
    assert torch.equal(half.unique(), torch.tensor([0, 1 / (1 - p)], dtype=torch.bfloat16))
    d.eval()
    assert torch.equal(d(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x) and not Dropout(1.0).train()(x).any()


def test_models_use_the_fast_dropout():
    from fmnist_sweep.models import Dropout

    for name in ("cnn", "rnn", "bilstm", "autoencoder", "encoder_classifier", "resnet"):
        model = instantiate(compose([f"model={name}"]).model)
        kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert kinds == {Dropout}, name


@pytest.mark.parametrize("cin,cout,k,bias,channels_last", [(32, 16, 2, True, True), (16, 1, 2, True, False),
                                                           (8, 4, 3, False, True)])
def test_fast_transposed_convolution_matches_torch(cin, cout, k, bias, channels_last):
    """Kernel = stride (non-overlapping patches): one matrix product, the same outputs and
    gradients as nn.ConvTranspose2d, in channels_last layout; other settings are torch's."""
    from fmnist_sweep.models import ConvTranspose2d

    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(cin, cout, k, stride=k, bias=bias)
    fast = ConvTranspose2d(cin, cout, k, stride=k, bias=bias)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, cin, 7, 6)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    y_ref, y = ref(x), fast(x)
    assert y.shape == (5, cout, 7 * k, 6 * k) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y_ref, [x, *ref.parameters()], g),
                    torch.autograd.grad(y, [x, *fast.parameters()], g)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    overlapping = ConvTranspose2d(cin, cout, 3, stride=2, padding=1)  # torch's own path
    overlapping.load_state_dict(torch.nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1).state_dict())
    assert overlapping(x).shape == (5, cout, 13, 11)


def test_autoencoder_pools_before_relu_with_the_same_function():
    """The encoder's max-pool -> ReLU order gives what the published ReLU -> max-pool does,
    outputs and gradients."""
    torch.manual_seed(0)
    model = instantiate(compose(["model=autoencoder"]).model).eval()
    net = model.encoder.net
    assert [type(m).__name__ for m in net[:3]] == ["Conv2d", "MaxPool2d", "ReLU"]
    published = torch.nn.Sequential(net[0], net[2], net[1], *net[3:])
    x = torch.rand(6, 1, 28, 28)

    def output_and_gradient(enc):
        z = enc(x)
        return z.detach(), torch.autograd.grad(z.square().sum(), net[0].weight)[0]

    for ours, theirs in zip(output_and_gradient(net), output_and_gradient(published)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _rnn_twins(monkeypatch, backend: str, inputs: int, hidden: int, **kwargs):
    """nn.RNN and our RNN with the same weights, our products through ``backend`` ("blas", "onednn")."""
    from fmnist_sweep.models import RNN
    from fmnist_sweep.models.fast import elman

    monkeypatch.setattr(elman, "_gemm_backend", lambda: backend)
    torch.manual_seed(0)
    ref = torch.nn.RNN(inputs, hidden, batch_first=True, **kwargs)
    fast = RNN(inputs, hidden, batch_first=True, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("backend", ["blas", "onednn"])
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_fast_rnn_matches_torch_outputs_and_gradients(nonlinearity, backend, monkeypatch):
    """The SimpleRNN's layer: its products through torch's BLAS or oneDNN and a hand-written backward, the same sequence, final state and gradients
    (input, both weights, both biases) as nn.RNN, leaving the incoming gradient as it
    was; with an initial state or under bf16 autocast it is torch's own."""
    ref, fast = _rnn_twins(monkeypatch, backend, 28, 32, nonlinearity=nonlinearity)
    x = torch.randn(7, 28, 28, requires_grad=True)
    (y_ref, h_ref), (y, h) = ref(x), fast(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    g, gh = torch.randn_like(y), torch.randn_like(h)
    for a, b in zip(torch.autograd.grad((y_ref * g).sum() + (h_ref * gh).sum(), [x, *ref.parameters()]),
                    torch.autograd.grad((y * g).sum() + (h * gh).sum(), [x, *fast.parameters()])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(y)
    kept = grad_out.clone()
    fast(x)[0].backward(grad_out)  # accumulated in place inside: must be a copy, not autograd's tensor
    assert torch.equal(grad_out, kept)
    # the first layer's input needs no gradient: weights still get theirs
    y2, _ = fast(x.detach())
    assert all(p is not None for p in torch.autograd.grad(y2.sum(), list(fast.parameters())))
    h0 = torch.randn(1, 7, 32)
    torch.testing.assert_close(fast(x, h0)[0], ref(x, h0)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x)[0].dtype == ref(x)[0].dtype


def test_fast_rnn_with_onednn_products_trains_under_torch_compile(monkeypatch):
    """trainer.compile with the SimpleRNN where its products go through oneDNN (AMD family 26):
    the compiled layer trains with torch's BLAS products (Inductor cannot lower oneDNN's linear
    for weights being trained), with nn.RNN's outputs and gradients."""
    ref, fast = _rnn_twins(monkeypatch, "onednn", 8, 8)
    x = torch.randn(4, 2, 8, requires_grad=True)  # two steps: the smallest sequence the fast path takes
    (y_ref, _), (y, _) = ref(x), torch.compile(fast)(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(y_ref.square().sum(), [x, *ref.parameters()]),
                    torch.autograd.grad(y.square().sum(), [x, *fast.parameters()])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vendor, family, backend", [("GenuineIntel", 6, "blas"), ("AuthenticAMD", 25, "blas"),
                                                     ("AuthenticAMD", 26, "onednn")])
def test_fast_rnn_picks_onednn_on_amd_family_26_and_mkl_elsewhere(tmp_path, vendor, family, backend):
    from fmnist_sweep.models import fast
    from fmnist_sweep.models.fast import elman

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
                       "flags\t\t: fpu avx512_bf16\nvmx flags\t: ept\n")
    assert elman._gemm_backend(str(cpuinfo)) == backend
    assert fast.cpuinfo_field("flags", str(cpuinfo)) == "fpu avx512_bf16"  # what bf16 autocast is decided on
    assert fast.cpuinfo_field("flags", str(tmp_path / "absent")) == ""


@pytest.mark.parametrize("processor, backend", [("AMD64 Family 26 Model 2 Stepping 0, AuthenticAMD", "onednn"),
                                                ("AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD", "blas"),
                                                ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", "blas")])
def test_fast_rnn_backend_where_there_is_no_cpuinfo(tmp_path, monkeypatch, processor, backend):
    """Windows has no /proc/cpuinfo: vendor and family come from platform.processor()."""
    from fmnist_sweep.models.fast import elman

    monkeypatch.setattr(elman.platform, "processor", lambda: processor)
    assert elman._gemm_backend(str(tmp_path / "absent")) == backend


def test_rnn_model_trains_with_the_fast_layer():
    from fmnist_sweep.models import RNN

    model = instantiate(compose(["model=rnn"]).model)
    assert [type(m) for m in model.layers] == [RNN] * 3
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
