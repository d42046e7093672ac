"""A1111's prompt styles (issue 14): a styles.csv read as A1111 reads it, merged as its
``merge_prompts`` merges, and reachable from the Python API (``text.styles``), the command line
(``--style``/``--styles-file``) and the server (``/sdapi/v1/prompt-styles``, the ``styles`` field),
driven by the unmodified webuiapi client."""

from __future__ import annotations

import shutil

import pytest
import webuiapi

import sfumato
from conftest import live_server
from sfumato.cli import main
from sfumato.data import BUNDLED_PATH
from sfumato.errors import ParamError
from sfumato.pipeline.infotext import read_image_parameters
from sfumato.server.app import ServerConfig, create_app
from sfumato.text.styles import apply_styles, merge_prompts, read_styles

CSV = '''name,prompt,negative_prompt
"framed","a picture of {prompt}, framed","blurry"
bright,"bright light",
"empty",,
'''


def test_merge_prompts_as_a1111():
    assert merge_prompts("a picture of {prompt}, framed", "a cat") == "a picture of a cat, framed"
    assert merge_prompts("bright light", " a cat ") == "a cat, bright light"
    assert merge_prompts("", " a cat ") == "a cat"
    assert merge_prompts("x", "") == "x"


def test_read_and_apply_in_order(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV)
    styles = read_styles(path)
    assert list(styles) == ["framed", "bright", "empty"]
    assert apply_styles("a cat", "", ["framed", "bright"], styles) == \
        ("a picture of a cat, framed, bright light", "blurry")
    with pytest.raises(ParamError, match="styles: unknown style 'nope'"):
        apply_styles("a cat", "", ["nope"], styles)


def test_command_line(tmp_path, capsys):
    path = tmp_path / "styles.csv"
    path.write_text(CSV)
    out = tmp_path / "x.png"
    assert main(["txt2img", "a red circle", "--style", "bright", "--styles-file", str(path), "--steps", "1",
                 "-o", str(out)]) == 0
    assert read_image_parameters(out).startswith("a red circle, bright light\n")
    assert main(["txt2img", "x", "--style", "nope", "--styles-file", str(path), "-o", str(out)]) == 2
    assert "unknown style" in capsys.readouterr().err


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    models = tmp_path_factory.mktemp("styles-models")
    shutil.copy(BUNDLED_PATH, models / "bundled.safetensors")
    (models / "styles.csv").write_text(CSV)
    app = create_app(ServerConfig(models_dir=models, model=models / "bundled.safetensors", watermark=False),
                     pipeline=sfumato.load())
    with live_server(app) as port:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)


def test_webuiapi_lists_and_applies_styles(api):
    assert api.get_prompt_styles() == [
        {"name": "framed", "prompt": "a picture of {prompt}, framed", "negative_prompt": "blurry"},
        {"name": "bright", "prompt": "bright light", "negative_prompt": ""},
        {"name": "empty", "prompt": "", "negative_prompt": ""}]
    result = api.txt2img(prompt="a red circle", styles=["framed"], seed=1, width=64, height=64)
    assert result.info["prompt"] == "a picture of a red circle, framed"
    assert result.info["negative_prompt"] == "blurry" and result.info["styles"] == ["framed"]
    assert result.image.info["parameters"].startswith("a picture of a red circle, framed\nNegative prompt: blurry")


def test_an_unknown_style_is_a_422_naming_the_field(api):
    r = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "styles": ["nope"], "steps": 1,
                                                          "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["field"] == "styles"
