"""The headless-browser checks themselves: what they must catch in a page that the Kubeflow UI
shows in its sandboxed frame (the pipeline's own pages are rendered in test_pipeline)."""

import base64
import io

import pytest
from PIL import Image

from tests.browser import Browser, kubeflow_frame


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opened = Browser(tmp_path_factory.mktemp("browser"))
    yield opened
    opened.close()


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 40), "teal").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_self_contained_page_renders_cleanly_with_its_image(browser, tmp_path):
    page = f"<html><body><h1>report</h1><img src='{png()}'><script>document.title = 'ok';</script></body></html>"
    rendered = browser.render(kubeflow_frame(page, tmp_path, "clean"), frame_document=True)
    assert rendered.problems == []
    assert [(image["complete"], image["width"]) for image in rendered.images] == [(True, 120)]
    assert Image.open(io.BytesIO(rendered.screenshot)).size[0] >= 1180


def test_what_fails_to_load_and_what_the_sandbox_blocks_is_reported(browser, tmp_path):
    page = ("<html><body><img src='figure.png'><img src='http://127.0.0.1:9/remote.png'><form action='x'></form>"
            "<script>document.forms[0].submit(); alert('done');</script>"
            "<script>window.localStorage.setItem('k', 'v');</script></body></html>")
    rendered = browser.render(kubeflow_frame(page, tmp_path, "broken"), frame_document=True)
    text = "\n".join(rendered.problems)
    assert "failed to load http://127.0.0.1:9/remote.png" in text             # a resource that cannot load
    assert "Not allowed to load local resource" in text and "figure.png" in text   # a file beside the page
    assert "SecurityError" in text and "localStorage" in text                 # the sandbox's opaque origin
    assert "allow-forms" in text and "allow-modals" in text                   # what the sandbox does not allow
    assert [image["width"] for image in rendered.images] == [0, 0]           # neither image decoded
