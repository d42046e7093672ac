"""The X/Y/Z plot and extras upscaling in the library and on the command line (the server's are in
test_server_scripts): every cell is compared with the library's own call for its settings, value
texts with A1111's range rules, Lanczos with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sfumato
from sfumato.commands import main
from sfumato.pipeline import grid
from sfumato.pipeline.infotext import params_from_infotext, parse_infotext
from sfumato.pipeline.params import ParamError
from sfumato.pipeline.resize import upscale_image, upscaled_size

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return sfumato.load(tiny_model, dtype="fp32")


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("text, kind, expected", [
    ("1, 2,3", int, [1, 2, 3]),
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-10 (+3)", int, [1, 4, 7, 10]),
    ("10-1 (-3)", int, [10, 7, 4]),          # A1111's end + 1 on a falling range leaves out the 1
    ("1-3 [3]", int, [1, 2, 3]),
    ("0-1 [5]", float, [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("0.5-1.5 (+0.5)", float, [0.5, 1.0, 1.5]),
    ('Euler,"DPM++ 2M, odd", Heun', str, ["Euler", "DPM++ 2M, odd", "Heun"]),
])
def test_values_as_a1111_reads_them(text, kind, expected):
    assert grid.parse_values(text, kind) == expected


@pytest.mark.parametrize("text, kind, fragment", [("1, x", int, "'x' is not a whole number"),
                                                  ("1-100000", int, "too many"), ("0-1 [0]", float, "count")])
def test_bad_values_name_the_field(text, kind, fragment):
    with pytest.raises(ParamError) as e:
        grid.parse_values(text, kind, "--xyz-x")
    assert e.value.field == "--xyz-x" and fragment in e.value.message


def test_plot_cells_equal_the_library_and_the_grid_holds_them(pipe):
    result = grid.plot(pipe, grid.axis("Seed", "1, 2"), grid.axis("Steps", "2-3"), legend=False, prompt=PROMPT,
                       sampler="euler")
    assert result.grid.size == (128, 128) and len(result.cells) == 4
    for i, (seed, steps) in enumerate([(1, 2), (2, 2), (1, 3), (2, 3)]):
        direct = pipe.txt2img(PROMPT, seed=seed, steps=steps, sampler="euler")
        assert np.array_equal(_rgb(result.cells[i].image), _rgb(direct.images[0]))
        r, c = divmod(i, 2)
        assert np.array_equal(_rgb(result.grid)[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64], _rgb(direct.images[0]))
    assert params_from_infotext(result.infotext)["seed"] == 1
    keys = parse_infotext(result.infotext)          # the script's keys read back, quoting undone
    assert (keys["Script"], keys["X Type"], keys["X Values"], keys["Y Values"]) == ("X/Y/Z plot", "Seed", "1, 2", "2, 3")


def test_plot_prompt_sr_sampler_z_axis_and_fixed_seed(pipe):
    x = grid.axis("Prompt S/R", "red, green")
    z = grid.axis("sampler", ["euler", "dpmpp_2m"])     # by request field too
    result = grid.plot(pipe, x, z=z, prompt=PROMPT, steps=2)
    seeds = {item.seed for item in result.cells}
    assert len(seeds) == 1                                # -1 became one seed for every cell
    seed = seeds.pop()
    for i, (sampler, prompt) in enumerate([("euler", PROMPT), ("euler", PROMPT.replace("red", "green")),
                                           ("dpmpp_2m", PROMPT), ("dpmpp_2m", PROMPT.replace("red", "green"))]):
        direct = pipe.txt2img(prompt, seed=seed, steps=2, sampler=sampler)
        assert np.array_equal(_rgb(result.cells[i].image), _rgb(direct.images[0])), (sampler, prompt)
    assert result.grid.width >= 4 * 64 and result.grid.height > 64   # two X/Y grids side by side, titled
    with pytest.raises(ParamError, match="did not find 'purple'"):
        grid.plot(pipe, grid.axis("Prompt S/R", "purple, green"), prompt=PROMPT, steps=2)


def test_denoising_is_the_hires_pass_s_in_txt2img_with_hires(pipe):
    result = grid.plot(pipe, grid.axis("Denoising", "0.5"), prompt=PROMPT, steps=2, seed=3, hires_scale=1.5,
                       hires_steps=1)
    direct = pipe.txt2img(PROMPT, seed=3, steps=2, hires_scale=1.5, hires_steps=1, hires_denoise=0.5)
    assert np.array_equal(_rgb(result.cells[0].image), _rgb(direct.images[0]))


def test_an_unknown_axis_and_a_batch_are_refused(pipe):
    with pytest.raises(ParamError, match="unknown axis"):
        grid.axis("Colour", "1")
    with pytest.raises(ParamError) as e:
        grid.plot(pipe, grid.axis("Seed", "1"), prompt=PROMPT, batch_size=2)
    assert e.value.field == "batch_size"


def test_cli_plot_writes_the_grid_and_the_cells(pipe, tiny_model, tmp_path, capsys):
    out = tmp_path / "plot.png"
    code, stdout, _ = cli(["txt2img", PROMPT, "--model", tiny_model, "--dtype", "fp32", "--steps", 2,
                           "--xyz-x", "Seed=4,5", "--xyz-y", "CFG Scale=2,6", "--xyz-cells", "-o", out], capsys)
    assert code == 0, stdout
    grid_image = Image.open(out)
    assert grid_image.width > 128 and "X Type: Seed" in grid_image.info["parameters"]
    cells = sorted(tmp_path.glob("plot-cell-*.png"))
    assert len(cells) == 4
    for path, (seed, cfg) in zip(cells, [(4, 2.0), (5, 2.0), (4, 6.0), (5, 6.0)]):
        direct = pipe.txt2img(PROMPT, seed=seed, steps=2, cfg_scale=cfg)
        assert np.array_equal(_rgb(Image.open(path)), _rgb(direct.images[0])), path.name


@pytest.mark.parametrize("flags, fragment", [(["--xyz-x", "Colour=1,2"], "--xyz-x: unknown axis"),
                                             (["--xyz-y", "Seed=1"], "need --xyz-x"),
                                             (["--xyz-x", "Seed"], "AXIS=VALUES"),
                                             (["--xyz-x", "Steps=2,x"], "not a whole number")])
def test_cli_plot_errors_are_one_line_and_exit_2(tiny_model, tmp_path, capsys, flags, fragment):
    code, _, err = cli(["txt2img", PROMPT, "--model", tiny_model, *flags, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


# -- extras upscaling -------------------------------------------------------------------------------------

def test_upscaled_sizes_as_a1111():
    image = Image.new("RGB", (40, 24))
    assert upscaled_size(image, 2.5) == (100, 60, None)
    assert upscaled_size(image, size=(80, 80)) == (133, 80, (80, 80))        # covers, then crops
    assert upscaled_size(image, size=(80, 80), crop=False) == (133, 80, None)
    with pytest.raises(ParamError):
        upscaled_size(image, 9)


def test_upscale_image_with_filters_and_refuses_a_non_upscaler(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    assert np.array_equal(_rgb(upscale_image(image, "Lanczos", 2)), _rgb(image.resize((80, 48), Image.LANCZOS)))
    cropped = upscale_image(image, "nearest", size=(48, 48))
    assert cropped.size == (48, 48)
    assert np.array_equal(_rgb(cropped), _rgb(image.resize((80, 48), Image.NEAREST))[:, 16:64])
    with pytest.raises(ParamError, match="not an x4 upscaler"):
        upscale_image(image, pipe, 2)


def test_cli_extras_keeps_the_infotext(pipe, tmp_path, capsys):
    source = pipe.txt2img(PROMPT, seed=1, steps=2)
    path = tmp_path / "in.png"
    from sfumato.pipeline.images import save_image

    save_image(source.images[0], path, source.items[0].infotext)
    out = tmp_path / "big.png"
    code, _, err = cli(["upscale", "--image", path, "--upscaler", "lanczos", "--scale", 1.5, "-o", out], capsys)
    assert code == 0, err
    big = Image.open(out)
    assert np.array_equal(_rgb(big), _rgb(source.images[0].resize((96, 96), Image.LANCZOS)))
    assert big.info["parameters"] == source.items[0].infotext
    code, _, err = cli(["upscale", "--image", path, "--upscaler", "lanczos", "--scale", 20, "-o", out], capsys)
    assert code == 2 and "--scale" in err
