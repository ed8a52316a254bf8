"""The compiled kernels (recreason.models.kernels) against the torch operations they replace: SharedPrefix.attend's
and LlamaRMSNorm's."""

import logging

import pytest

torch = pytest.importorskip("torch")


def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


def _both(shared, query, key, value, scaling):
    from recreason.models import registry

    registry.use_kernels("torch")
    try:
        ours = shared.attend(0, query, key, value, scaling)[0]
        registry.use_kernels("compiled")
        theirs = shared.attend(0, query, key, value, scaling)[0]
    finally:
        registry.use_kernels("torch")
    return ours, theirs


def _close(ours, theirs):
    """The kernel rounds as the torch path does and sums in another order: outputs equal but for a last bit here
    and there (a bf16 ulp is 2^-7 of the value)."""
    assert theirs.dtype == torch.bfloat16 and theirs.shape == ours.shape
    a, b = ours.float(), theirs.float()
    ulp = a.abs().clamp_min(2 ** -20) * 2 ** -7
    assert bool(((a - b).abs() <= ulp * 1.01).all()), float((a - b).abs().max())
    assert float((a != b).float().mean()) < 0.01


@pytest.mark.parametrize("pairs", [True, False], ids=["bf16 pairs", "fp32 operands"])
def test_the_compiled_kernel_attends_as_the_torch_operations_do(pairs, monkeypatch):
    """Rows of uneven prompts (one left-padded), rows and a prompt leaving (select), a longer prompt joining with
    fewer own tokens (own_bias), a power-of-two scaling and another: the kernel's outputs are the torch path's but
    for a last bit in under 1% of them, with its prompt operands as bf16 pairs (AVX-512 BF16) and as fp32."""
    from recreason.models import kernels
    from recreason.models.registry import SharedPrefix

    kernel = kernels.compiled()
    if kernel is None:
        pytest.fail("the kernels did not build: a C compiler is part of the test set-up")
    if pairs and not kernel.pairs:
        pytest.skip("this CPU has no AVX-512 BF16: the kernel was built for fp32 operands only")
    monkeypatch.setitem(kernels._loaded, "compiled", kernels.Kernels(kernel.attention, pairs, kernel.rms_norm))
    torch.manual_seed(0)
    prompts, kv_heads, group, d, length, own = 4, 3, 3, 64, 37, 5
    owner = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    mask = torch.ones(prompts, length)
    mask[1, :11] = 0
    shared = SharedPrefix([_bf16(prompts, kv_heads, length, d)], [_bf16(prompts, kv_heads, length, d)], mask, owner)
    rows = len(owner)
    for scaling in (0.125, 0.1):
        q = _bf16(rows, kv_heads * group, 1, d, scale=3)
        k, v = _bf16(rows, kv_heads, own, d), _bf16(rows, kv_heads, own, d)
        _close(*_both(shared, q, k, v, scaling))

    keep = torch.tensor([0, 2, 6, 7, 9])  # prompt 1's and 2's rows have ended
    shared.select(keep)
    q = _bf16(len(keep), kv_heads * group, 1, d)
    k, v = _bf16(len(keep), kv_heads, own, d), _bf16(len(keep), kv_heads, own, d)
    _close(*_both(shared, q, k, v, 0.125))

    longer = length + 9
    shared.join([_bf16(1, kv_heads, longer, d)], [_bf16(1, kv_heads, longer, d)], torch.ones(1, longer),
                 torch.zeros(2, dtype=torch.long))
    own_mask = torch.ones(len(keep) + 2, own)
    own_mask[len(keep):, :3] = 0
    shared.own_bias = (1 - own_mask) * torch.finfo(torch.bfloat16).min
    n = len(keep) + 2
    q, k, v = _bf16(n, kv_heads * group, 1, d), _bf16(n, kv_heads, own, d), _bf16(n, kv_heads, own, d)
    ours, theirs = _both(shared, q, k, v, 0.125)
    _close(ours, theirs)
    # the joined rows see their own prompt and their last 2 own tokens only: moving the masked ones changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[len(keep):, :, :3] = _bf16(2, kv_heads, 3, d, scale=5)
    v2[len(keep):, :, :3] = _bf16(2, kv_heads, 3, d, scale=5)
    assert torch.equal(_both(shared, q, k2, v2, 0.125)[1], theirs)


def test_fp32_models_keep_the_torch_operations():
    """The kernel is for bf16: an fp32 query goes through the torch operations, bit for bit the same either way."""
    from recreason.models.registry import SharedPrefix

    torch.manual_seed(1)
    shared = SharedPrefix([torch.randn(2, 1, 6, 8)], [torch.randn(2, 1, 6, 8)], torch.ones(2, 6),
                          torch.tensor([0, 1, 1]))
    q, k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8)
    ours, theirs = _both(shared, q, k, v, 0.5)
    assert torch.equal(ours, theirs)


def test_without_a_compiler_decoding_keeps_the_torch_operations(monkeypatch, tmp_path, caplog):
    """No C compiler: the kernel is None with one warning saying why, and attention runs as torch operations."""
    from recreason.models import kernels
    from recreason.models.registry import SharedPrefix

    monkeypatch.setenv("RECREASON_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="recreason.models.kernels"):
        assert kernels.compiled() is None
        assert kernels.compiled() is None
    warned = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warned) == 1 and "no C compiler" in warned[0].getMessage()
    torch.manual_seed(2)
    shared = SharedPrefix([_bf16(1, 1, 5, 8)], [_bf16(1, 1, 5, 8)], torch.ones(1, 5), torch.tensor([0, 0]))
    q, k, v = _bf16(2, 3, 1, 8), _bf16(2, 1, 1, 8), _bf16(2, 1, 1, 8)
    ours, theirs = _both(shared, q, k, v, 0.125)
    assert torch.equal(ours, theirs)


def test_a_failed_build_says_what_the_compiler_said(monkeypatch, tmp_path):
    """A compiler that fails leaves no library behind and raises with its message."""
    from recreason.models import kernels

    monkeypatch.setenv("RECREASON_CACHE", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\n"
                      "echo 'cc: no luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="no luck"):
        kernels.build(str(broken))
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_the_kernels_setting_is_checked():
    from recreason.config import ConfigError, load_config
    from recreason.models.registry import use_kernels

    assert load_config(None, ["generate.kernels=compiled"])["generate"].kernels == "compiled"
    with pytest.raises(ConfigError, match="kernels"):
        load_config(None, ["generate.kernels=fast"])
    with pytest.raises(ValueError, match="torch, compiled"):
        use_kernels("fast")


def test_the_compiled_rms_norm_normalises_as_llama_does():
    """A llama RMS norm switched by compiled_norms: with ``compiled`` its bf16 outputs are LlamaRMSNorm's but for a
    last bit in a few (the sum of squares in another order), for decoding's [rows, 1, dim] and a prefill's
    [prompts, tokens, dim], large and small rows alike; with ``torch``, and in fp32 or with gradients, its own
    forward bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from recreason.models import registry

    torch.manual_seed(3)
    norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.3 + 1)
    own = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    own.load_state_dict(norm.state_dict())
    registry.compiled_norms(torch.nn.Sequential(norm))
    registry.compiled_norms(torch.nn.Sequential(norm))  # idempotent
    assert norm.forward.func is registry._compiled_norm
    x = torch.cat([_bf16(40, 1, 576, scale=3), _bf16(24, 1, 576, scale=0.01)])
    batch = _bf16(3, 150, 576, scale=20)
    try:
        registry.use_kernels("compiled")
        with torch.no_grad():
            for inputs in (x, batch, x[::2]):  # a strided input too
                ours, theirs = own(inputs), norm(inputs)
                _close(ours, theirs)
                assert float((ours != theirs).float().mean()) < 0.001
            assert torch.equal(norm(x.float()), own.float()(x.float()))  # fp32 keeps LlamaRMSNorm's forward
        own.to(torch.bfloat16)
        assert torch.equal(norm(x), own(x))  # with gradients enabled too
        registry.use_kernels("torch")
        with torch.no_grad():
            assert torch.equal(norm(batch), own(batch))
    finally:
        registry.use_kernels("torch")
