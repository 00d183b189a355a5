"""The comparison's output: the table, the summary and the winner line (``mono_quant.compare``), the plot
(``mono_quant.plot``).

Comparisons are built from observers fed small tensors, without a model, so each test takes milliseconds
(the plot tests a few hundred).
"""

import pytest
import torch

from mono_quant import compare, plot
from mono_quant.core.registry import ALIASES, OBSERVERS

LONG = "0.model.encoder.layer.0.attention.self.query"  # wider than the table's first column used to be


def _comparison(layers, kinds=("minmax", "per_channel"), held_out=None) -> compare.Comparison:
    """Observers of ``kinds`` on every layer, fed seeded data; scored on ``held_out[layer]`` (default: more
    of the same data)."""
    g = torch.Generator().manual_seed(0)
    observers, seconds, inputs = {}, {}, {}
    for i, layer in enumerate(layers):
        row = {k: compare.make_observer(k, torch.int8, "affine", torch.nn.Linear(1, 1)) for k in kinds}
        x = torch.randn(16, 8, generator=g) * (i + 1)
        for obs in row.values():
            obs(x)
        observers[layer], seconds[layer] = row, dict.fromkeys(kinds, 1e-3)
        inputs[layer] = (held_out or {}).get(layer, torch.randn(16, 8, generator=g) * (i + 1))
    scores = compare.score_observers(observers, seconds, inputs)
    unmeasured = {layer: compare.unmeasurable(inputs[layer]) for layer in scores}
    unmeasured = {k: v for k, v in unmeasured.items() if v is not None}
    return compare.Comparison(scores, torch.int8, "affine", 1, "", unmeasured)


def test_table_columns_fit_long_layer_names():
    cmp = _comparison([LONG, "lm_head", "0.model.encoder.layer.0.intermediate.dense"])
    lines = compare.format_table(cmp).splitlines()
    header, rows = lines[0], lines[2:]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(header)
    assert len({len(line) for line in [header, *rows]}) == 1  # every row as wide as the header
    observer_col = header.index("observer")
    assert observer_col > len(LONG)
    for line in rows:
        layer, rest = line[:observer_col], line[observer_col:]
        assert layer.rstrip() in (LONG, "lm_head", "0.model.encoder.layer.0.intermediate.dense", "")
        assert rest.split()[0] in ("minmax", "per_channel")  # the observer column starts where its title does
    # the SQNR column (right-aligned, then the best mark) and the time column end under their titles
    sqnr_end = header.index("SQNR dB") + len("SQNR dB")
    for line in rows:
        assert line[sqnr_end - 1] != " " and line[sqnr_end] in "* "
        assert line.rstrip().endswith(line.split()[-1]) and line[-1] != " "


def test_short_names_keep_the_usual_layout():
    table = compare.format_table(_comparison(["fc"]))
    header = table.splitlines()[0]
    assert header.index("observer") == 23 and header.startswith("layer" + " " * 18)


def test_all_nan_held_out_is_not_measured_and_names_no_winner():
    nan = torch.full((16, 8), float("nan"))
    cmp = _comparison(["a", "b"], held_out={"a": nan, "b": nan})
    assert all(s.sqnr_db is None for row in cmp.scores.values() for s in row.values())
    assert cmp.best("a") is None and cmp.measured() == []
    table = compare.format_table(cmp)
    assert "inf" not in table and "*" not in table
    rows = [line for line in table.splitlines()[2:] if not line.startswith("n/a:")]
    assert all("n/a" in line for line in rows)
    assert "n/a: a: its held-out input has no finite value" in table
    summary = compare.format_summary(cmp).splitlines()[1:]
    assert all(line.split()[1:3] == ["n/a", "0"] for line in summary)
    assert compare.winner_line(cmp).endswith("no winner")
    assert "winner:" not in compare.winner_line(cmp)


def test_a_layer_without_signal_counts_in_no_mean_and_no_win():
    cmp = _comparison(
        ["zeros", "fine", "nan"],
        held_out={"zeros": torch.zeros(4, 8), "nan": torch.full((2, 8), float("nan"))},
    )
    assert cmp.unmeasured == {
        "zeros": "its held-out input is all zeros",
        "nan": "its held-out input has no finite value",
    }
    assert cmp.measured() == ["fine"]
    best = cmp.best("fine")
    line = compare.winner_line(cmp)
    assert line.startswith(f"winner: {best}, best SQNR on 1 of 1 layers") and line.endswith("; 2 layers n/a")
    summary = {line.split()[0]: line.split()[1:] for line in compare.format_summary(cmp).splitlines()[1:]}
    for kind, (mean, won, _) in summary.items():
        assert float(mean) == pytest.approx(
            cmp.scores["fine"][kind].sqnr_db, abs=0.01
        )  # the measured layer only
        assert int(won) == (kind == best)


def test_every_registry_name_has_a_fixed_colour():
    assert set(plot.OBSERVER_COLORS) == set(OBSERVERS)
    assert len(set(plot.OBSERVER_COLORS.values())) == len(OBSERVERS)
    for alias, name in ALIASES.items():
        assert plot.observer_color(alias) == plot.OBSERVER_COLORS[name]
    assert plot.observer_color("HistogramObserver") == plot.OBSERVER_COLORS["histogram"]


def _range_colors(fig) -> dict[str, set]:
    from matplotlib.colors import to_hex

    colors: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            gid = line.get_gid() or ""
            if gid.startswith("range:"):
                colors.setdefault(gid.removeprefix("range:"), set()).add(to_hex(line.get_color()))
    return colors


def test_plot_colours_do_not_depend_on_the_observer_order(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    kinds = ("minmax", "kl", "per_channel")
    a = _range_colors(plot.comparison_figure(_comparison(["fc"], kinds)))
    b = _range_colors(plot.comparison_figure(_comparison(["fc"], kinds[::-1])))
    assert a == b == {k: {to_hex(plot.OBSERVER_COLORS[k])} for k in kinds}
    plot.plot_comparison(_comparison(["fc"], kinds), str(tmp_path / "p.svg"))  # the format of the name
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_plot_with_many_layers_keeps_title_and_one_legend_clear_of_the_panels():
    pytest.importorskip("matplotlib")
    layers = [f"0.model.encoder.layer.{i // 6}.attention.self.query.{i}" for i in range(37)]
    cmp = _comparison(layers, ("minmax", "moving_average", "per_channel"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot.comparison_figure(cmp)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lay out the text, so that its extents are real
    renderer = canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 37
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["minmax", "moving_average", "per_channel"]
    top_of_panels = max(ax.get_tightbbox(renderer).y1 for ax in panels)  # panel titles included
    assert fig._suptitle.get_window_extent(renderer).y0 > top_of_panels
    assert legend.get_window_extent(renderer).y0 > top_of_panels
    _, height = fig.get_size_inches()
    assert height > 10 * 2.0  # 10 rows of panels: the figure grew with them instead of squeezing them
    for a_ax in panels:  # no panel's title runs into another panel
        title = a_ax.title.get_window_extent(renderer)
        for b_ax in panels:
            if b_ax is not a_ax:
                assert not title.overlaps(b_ax.get_window_extent(renderer))
