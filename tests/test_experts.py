"""MoE experts of transformers 5.x: each expert's inputs observed apart, outputs untouched, empty experts.

Models are built from tiny configs with random weights (offline). The oracle for what an expert reads is
the model itself: under the ``eager`` experts implementation every expert calls ``F.linear`` with a slice of
the stacked weights, so a spy on ``F.linear`` sees each expert's ``gate_up_proj`` and ``down_proj`` inputs as
the model computes them; plain observers fed those give each expert's qparams.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq
from mono_quant.calibration.experts import expert_modules, expert_weight_qparams

transformers = pytest.importorskip("transformers")

E, K, HIDDEN, V = 4, 2, 32, 64
KINDS = {
    "minmax": (mq.MinMaxObserver, {}),
    "histogram": (mq.HistogramObserver, {"bins": 64}),
    "per_channel": (mq.PerChannelMinMaxObserver, {"ch_axis": -1}),
}


def _common() -> dict:
    return {
        "vocab_size": V,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": K,
        "max_position_embeddings": 64,
    }


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**_common(), intermediate_size=48, num_local_experts=E)
    return transformers.MixtralForCausalLM(config).eval()


def qwen2_moe() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        **_common(),
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_experts=E,
        decoder_sparse_step=1,
    )
    return transformers.Qwen2MoeForCausalLM(config).eval()


MODELS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}


def _batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, V, (2, 9), generator=g)} for _ in range(n)]


def _layers(model) -> list[str]:
    return [f"{name}.{proj}" for name in expert_modules(model) for proj in ("gate_up_proj", "down_proj")]


def _spy_expert_inputs(model, batches, monkeypatch) -> dict[str, dict[int, list[torch.Tensor]]]:
    """``{layer: {expert: [inputs]}}`` as the eager implementation's ``F.linear`` calls receive them."""
    model.set_experts_implementation("eager")
    ranges = []
    for name, module in expert_modules(model).items():
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(module, proj)
            ranges.append((f"{name}.{proj}", w.data_ptr(), w.stride(0) * w.element_size(), w.shape[0]))
    seen: dict[str, dict[int, list[torch.Tensor]]] = {layer: {} for layer, *_ in ranges}
    linear = F.linear

    def spy(x, weight, bias=None):
        for layer, base, stride, experts in ranges:
            e, offset = divmod(weight.data_ptr() - base, stride)
            if 0 <= e < experts and offset == 0 and weight.dim() == 2:
                seen[layer].setdefault(e, []).append(x.detach().clone())
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    model.set_experts_implementation("grouped_mm")
    return seen


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_experts_modules_are_found_and_named_by_projection(make):
    model = make()
    assert list(expert_modules(model)) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    result = mq.run_calibration(model, _batches(1), progress=False)
    assert result.experts == dict.fromkeys(_layers(model), E)
    names = list(result)
    assert names.index("model.layers.0.self_attn.o_proj") < names.index(
        "model.layers.0.mlp.experts.gate_up_proj"
    )
    assert names.index("model.layers.0.mlp.experts.down_proj") < names.index(
        "model.layers.1.self_attn.q_proj"
    )
    without = mq.run_calibration(model, _batches(1), experts=False, progress=False)
    assert not without.experts and not set(_layers(model)) & set(without)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_other_families_on_the_same_template_are_calibrated_per_expert(family):
    torch.manual_seed(0)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **_common(), intermediate_size=64, moe_intermediate_size=24, num_experts=E, head_dim=8
        )
        model = transformers.Qwen3MoeForCausalLM(config).eval()
    else:
        config = transformers.OlmoeConfig(**_common(), intermediate_size=24, num_experts=E)
        model = transformers.OlmoeForCausalLM(config).eval()
    batches = _batches(1)
    with torch.no_grad():
        plain = model(**batches[0]).logits
    during = []
    model.register_forward_hook(lambda _m, _a, out: during.append(out.logits))
    result = mq.run_calibration(model, batches, progress=False)
    assert torch.equal(during[0], plain)
    assert result.experts == dict.fromkeys(_layers(model), E)
    for layer in _layers(model):
        assert sum(result[layer].tokens_seen.tolist()) == 2 * 9 * K


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_calibration_leaves_the_logits_bit_equal(make, implementation):
    model = make()
    model.set_experts_implementation(implementation)
    batches = _batches()
    with torch.no_grad():
        plain = [model(**b).logits for b in batches]
    during = []
    handle = model.register_forward_hook(lambda _m, _a, out: during.append(out.logits))
    for kind in ("minmax", "histogram"):
        during.clear()
        mq.run_calibration(model, batches, kind, progress=False)
        assert len(during) == len(batches)
        for got, want in zip(during, plain, strict=True):
            assert torch.equal(got, want), kind
    handle.remove()
    with torch.no_grad():
        after = [model(**b).logits for b in batches]
    assert all(torch.equal(a, p) for a, p in zip(after, plain, strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_each_expert_has_the_statistics_of_the_inputs_it_reads(make, kind, monkeypatch):
    model, batches = make(), _batches()
    cls, kwargs = KINDS[kind]
    result = mq.run_calibration(model, batches, kind, observer_kwargs=kwargs, progress=False)  # grouped_mm
    spied = _spy_expert_inputs(model, batches, monkeypatch)
    qparams = result.qparams()
    for layer in _layers(model):
        obs = result[layer]
        rows = {e: torch.cat(xs) for e, xs in spied[layer].items()}
        assert obs.tokens_seen.tolist() == [rows[e].shape[0] if e in rows else 0 for e in range(E)], layer
        assert sum(obs.tokens_seen.tolist()) == len(batches) * 2 * 9 * K  # every routed pair, once
        scale, zp = qparams[layer]
        assert scale.shape[0] == E and zp.shape == scale.shape
        for e, x in rows.items():
            oracle = cls(**kwargs)
            oracle(x)
            want_scale, want_zp = oracle.calculate_qparams()
            assert torch.equal(scale[e], want_scale), f"{layer} expert {e}"
            assert torch.equal(zp[e], want_zp), f"{layer} expert {e}"


def _ban(experts: list[int]):
    """A forward hook on a top-k router that never picks ``experts`` (their logits set to -inf)."""

    def hook(module, _args, out):
        logits = out[0].clone()
        logits[:, experts] = float("-inf")
        top, index = torch.topk(torch.softmax(logits.float(), dim=-1), module.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(out[1].dtype), index

    return hook


def _banned(make, experts: list[int]) -> nn.Module:
    model = make()
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_ban(experts))
    return model


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_empty_experts_are_reported_and_decided(make, monkeypatch):
    model, batches = _banned(make, [1, 3]), _batches()
    result = mq.run_calibration(model, batches, progress=False)
    layers = _layers(model)
    assert result.empty_experts() == dict.fromkeys(layers, [1, 3])
    with pytest.raises(
        ValueError, match=r"layer 'model.layers.0.mlp.experts.gate_up_proj': 2 of 4 experts .*1, 3"
    ):
        result.qparams()
    with pytest.raises(ValueError, match="empty='nan' is not one of 'error', 'skip', 'share'"):
        result.qparams(empty="nan")
    skip, share = result.qparams(empty="skip"), result.qparams(empty="share")
    spied = _spy_expert_inputs(model, batches, monkeypatch)
    for layer in layers:
        union = mq.MinMaxObserver()
        for e in (0, 2):
            one = mq.MinMaxObserver()
            one(torch.cat(spied[layer][e]))
            union(torch.cat(spied[layer][e]))
            for got in (skip, share):
                assert torch.equal(got[layer][0][e], one.calculate_qparams()[0]), layer
        assert set(spied[layer]) == {0, 2}  # the router really never picked 1 and 3
        scale, zp = skip[layer]
        assert scale[[1, 3]].tolist() == [0.0, 0.0] and zp[[1, 3]].tolist() == [0, 0]
        assert not torch.isnan(scale).any() and bool((scale[[0, 2]] > 0).all())
        want_scale, want_zp = union.calculate_qparams()
        for e in (1, 3):
            assert torch.equal(share[layer][0][e], want_scale) and torch.equal(share[layer][1][e], want_zp)
    other = {k: v for k, v in share.items() if k not in layers}
    assert other and all(k in skip for k in other)  # the other layers are as before


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_expert_weights_get_qparams_per_expert_and_output_channel(make):
    model = make()
    qparams = expert_weight_qparams(model)
    assert list(qparams) == _layers(model)
    for name, module in expert_modules(model).items():
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(module, proj)
            scale, zp = qparams[f"{name}.{proj}"]
            assert scale.shape == zp.shape == w.shape[:2]
            for e in range(E):
                oracle = mq.PerChannelMinMaxObserver(ch_axis=0, qscheme="symmetric")
                oracle(w[e].detach())
                assert torch.equal(scale[e], oracle.calculate_qparams()[0]), f"{name}.{proj} expert {e}"
    with pytest.raises(ValueError, match="no fused experts module"):
        expert_weight_qparams(nn.Linear(3, 3))


class MoENet(nn.Module):
    """A token-wise MoE model: embeddings, then a Mixtral sparse MoE block; padding changes nothing for the
    real tokens, so a padded batch can be compared with the sequences alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        config = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=E)
        config.num_experts_per_tok = K
        self.emb = nn.Embedding(V, 16)
        with torch.no_grad():
            self.emb.weight[0] = 8.0  # the padding token: outside every real token's range
        self.moe = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
        for p in self.moe.parameters():
            nn.init.normal_(p, std=0.5)
        self.moe.experts.config._experts_implementation = "eager"

    def forward(self, input_ids, attention_mask=None):
        return self.moe(self.emb(input_ids))


def test_padded_tokens_are_routed_to_no_expert():
    model, g = MoENet(), torch.Generator().manual_seed(8)
    seqs = [torch.randint(1, V, (n,), generator=g) for n in (6, 2, 4)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 6 - len(s) :], mask[i, 6 - len(s) :] = s, 1  # left padding
    padded = mq.run_calibration(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    alone = mq.run_calibration(model, [{"input_ids": s[None]} for s in seqs], progress=False)
    # the real tokens as one unpadded sequence: each expert's down_proj input is recomputed from the same
    # rows as under the mask (a matmul over other row counts may round the last bit differently)
    joined = mq.run_calibration(model, [{"input_ids": torch.cat(seqs)[None]}], progress=False)
    whole = mq.run_calibration(model, [{"input_ids": ids}], progress=False)
    layers = ["moe.experts.gate_up_proj", "moe.experts.down_proj"]
    assert padded.masked_layers() == layers
    got = padded.qparams(empty="skip")
    for layer in layers:
        assert padded[layer].tokens_seen.tolist() == alone[layer].tokens_seen.tolist()
        assert sum(padded[layer].tokens_seen.tolist()) == 12 * K
        assert sum(whole[layer].tokens_seen.tolist()) == 18 * K  # without the mask the padding counts
        oracles = (joined, alone) if layer.endswith("gate_up_proj") else (joined,)
        for oracle in oracles:
            want = oracle.qparams(empty="skip")[layer]
            assert all(torch.equal(a, b) for a, b in zip(got[layer], want, strict=True)), layer
    assert not torch.equal(whole.qparams(empty="skip")[layers[0]][0], got[layers[0]][0])


def test_an_experts_call_without_expert_ids_is_a_clear_error():
    model = MoENet()

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = model.moe.experts

        def forward(self, x):
            return self.experts(x, torch.zeros(x.shape[0], K), None)  # float ids

    with pytest.raises(
        ValueError, match=r"got hidden_states torch.float32 \(5, 16\) and top_k_index torch.float32"
    ):
        mq.run_calibration(Broken(), [torch.randn(5, 16)], progress=False)


class Routed(nn.Module):
    """An experts module called with a fixed routing (``index`` [T, k], uniform weights)."""

    def __init__(self, experts: nn.Module, index: torch.Tensor):
        super().__init__()
        self.experts, self.index = experts, index

    def forward(self, x):
        return self.experts(x, self.index, torch.full(self.index.shape, 1.0 / K))


def test_sentinel_expert_ids_count_for_no_expert():
    # expert parallelism marks the pairs of experts on other ranks with ids >= E; the eager forward skips them
    experts = MoENet().moe.experts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=g)
    index = torch.tensor([[0, 4], [1, 2], [4, 4], [2, 0], [1, 4], [3, 1]])
    result = mq.run_calibration(Routed(experts, index), [x], progress=False)
    up = result["experts.gate_up_proj"]
    assert up.tokens_seen.tolist() == [2, 3, 2, 1]
    for e in range(E):
        oracle = mq.MinMaxObserver()
        oracle(x[(index == e).any(1)])
        assert torch.equal(up.segment(e).running_max, oracle.running_max), e
        assert torch.equal(up.segment(e).running_min, oracle.running_min), e
    assert result["experts.down_proj"].tokens_seen.tolist() == [2, 3, 2, 1]


def test_transposed_interleaved_experts_with_biases():
    # gpt-oss's layout: weights [E, in, out], gate and up interleaved, biases, its own clamped gate
    config = transformers.GptOssConfig(hidden_size=16, intermediate_size=12, num_local_experts=E)
    experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(config)
    experts.config._experts_implementation = "eager"
    torch.manual_seed(1)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(7, 16)
    index = torch.tensor([[0, 1], [1, 3], [3, 0], [0, 1], [1, 0], [3, 1], [0, 3]])  # expert 2: no token
    model = Routed(experts, index)
    gated = []
    apply_gate = experts._apply_gate
    experts._apply_gate = lambda y: gated.append(apply_gate(y)) or gated[-1]
    with torch.no_grad():
        plain = model(x)
    del experts._apply_gate
    result = mq.run_calibration(model, [x], progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert result.empty_experts() == dict.fromkeys(["experts.gate_up_proj", "experts.down_proj"], [2])
    down = result.qparams(empty="skip")["experts.down_proj"][0]
    for e, inputs in zip([0, 1, 3], gated, strict=True):  # the eager loop runs over the experts hit, in order
        oracle = mq.MinMaxObserver()
        oracle(inputs)
        assert torch.equal(down[e], oracle.calculate_qparams()[0]), e
    weights = expert_weight_qparams(model)
    assert weights["experts.gate_up_proj"][0].shape == (E, 24) and weights["experts.down_proj"][0].shape == (
        E,
        16,
    )
    oracle = mq.PerChannelMinMaxObserver(ch_axis=1, qscheme="symmetric")  # out channels are the last dim
    oracle(experts.gate_up_proj[2].detach())
    assert torch.equal(weights["experts.gate_up_proj"][0][2], oracle.calculate_qparams()[0])


@pytest.mark.parametrize("kind", ["amax_history", "per_block"])
def test_observers_without_segments_refuse_experts_before_the_model_runs(kind):
    model = MoENet()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(
        NotImplementedError, match=r"cannot observe the experts of 'moe.experts'.*experts=False"
    ):
        mq.run_calibration(model, [torch.randint(0, V, (1, 4))], kind, progress=False)
    assert calls == []


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_every_layer_of_a_hugging_face_moe_model_is_masked(make):
    # [batch, seq, hidden] inputs of the attention and lm_head, [batch * seq, hidden] of the experts, the
    # router-free shared expert and its gate: all under the attention mask
    model = make()
    batch = _batches(1)[0]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, :3] = 0  # left padding of the first sequence
    result = mq.run_calibration(model, [batch], progress=False)
    assert result.unmasked_layers() == [] and result.masked_layers() == list(result)
    for layer in _layers(model):
        assert sum(result[layer].tokens_seen.tolist()) == (2 * 9 - 3) * K
