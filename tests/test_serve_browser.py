"""The web chat page of ``lmlab serve``: send messages, read the streamed replies.

In headless Chromium, which needs ``chromium`` and ``chromium-driver`` (Debian
packages) and the ``selenium`` Python package; and the page's own script under
Node.js with the DOM stubbed. Each test skips cleanly where its tools are missing.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e .[serve])")

from test_serve import write_model  # noqa: E402



def test_chat_page_streams_multi_turn_replies(driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lmlab.models.generation import generate
    from lmlab.serving.server import ServerThread, build_service, create_app

    service = build_service(str(write_model(tmp_path)), device="cpu", model_name="tiny")
    srv = ServerThread(create_app(service)).start()
    try:
        driver.get(srv.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        for id_, value in (("temperature", "0"), ("max_tokens", "12")):
            box = driver.find_element(By.ID, id_)
            box.clear()
            box.send_keys(value)
        history = []
        for turn, text in enumerate(("the cat sat", "and then?")):
            driver.find_element(By.ID, "input").send_keys(text + "\n")
            history.append({"role": "user", "content": text})
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.assistant[data-done="true"]')) == turn + 1)
            ids = service.prompter.chat_ids(history)
            stops = service.prompter.stop_ids(True)
            out = generate(service.engine.model, torch.tensor([ids]), max_new_tokens=12, temperature=0, stop_token_ids=stops)
            want = service.engine.tokenizer.decode([t for t in out.responses[0][out.response_mask[0].bool()].tolist()
                                                    if t not in stops], skip_special_tokens=True)
            got = driver.execute_script("return document.querySelectorAll('.assistant')[arguments[0]].textContent", turn)
            assert got == want  # the second turn's prompt carries the first turn: the page keeps the history
            history.append({"role": "assistant", "content": got})
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".user")] == ["the cat sat", "and then?"]
    finally:
        srv.stop()


NODE_DRIVER = r"""
// The page's own script against the live server, with the few DOM calls it makes stubbed.
const [base, scriptFile] = process.argv.slice(2);
const realFetch = fetch;
globalThis.fetch = (url, opts) => realFetch(base + url, opts);
class El {
  constructor(tag) { Object.assign(this, {tag, children: [], className: "", dataset: {}, value: "", textContent: "",
                                          listeners: {}, disabled: false, scrollTop: 0, scrollHeight: 0}); }
  appendChild(c) { this.children.push(c); return c; }
  addEventListener(type, fn) { this.listeners[type] = fn; }
  set innerHTML(v) { this.children = []; }
}
const els = {};
globalThis.document = {getElementById: id => els[id] || (els[id] = new El(id)), createElement: tag => new El(tag)};
const wait = async cond => { for (let i = 0; i < 3000 && !cond(); i++) await new Promise(r => setTimeout(r, 10)); };
(async () => {
  (0, eval)(require("fs").readFileSync(scriptFile, "utf8"));
  const log = document.getElementById("log");
  await wait(() => document.getElementById("model").textContent !== "");
  document.getElementById("temperature").value = "0";
  document.getElementById("max_tokens").value = "12";
  document.getElementById("top_p").value = "1";
  for (const text of ["the cat sat", "and then?"]) {
    const before = log.children.length;
    document.getElementById("input").value = text;
    document.getElementById("form").listeners.submit({preventDefault() {}});
    await wait(() => log.children.length === before + 2 && log.children[before + 1].dataset.done === "true");
  }
  console.log(JSON.stringify({model: document.getElementById("model").textContent,
                              messages: log.children.map(c => [c.className, c.textContent])}));
})();
"""


def test_chat_page_script_streams_multi_turn_replies_under_node(tmp_path):
    """Where Chromium is missing: the page's script itself, run by Node.js with the DOM stubbed, streams two
    turns from the live server, and each reply equals greedy generate on the conversation so far."""
    import json
    import re
    import subprocess

    import httpx

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from lmlab.models.generation import generate
    from lmlab.serving.server import ServerThread, build_service, create_app

    service = build_service(str(write_model(tmp_path)), device="cpu", model_name="tiny")
    srv = ServerThread(create_app(service)).start()
    try:
        html = httpx.get(srv.url + "/").text
        script = re.search(r"<script>(.*)</script>", html, re.S).group(1)
        (tmp_path / "page.js").write_text(script)
        (tmp_path / "driver.js").write_text(NODE_DRIVER)
        r = subprocess.run([node, str(tmp_path / "driver.js"), srv.url, str(tmp_path / "page.js")], capture_output=True,
                           text=True, timeout=60)
    finally:
        srv.stop()
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["model"] == "tiny"
    roles = [cls for cls, _ in result["messages"]]
    assert roles == ["msg user", "msg assistant", "msg user", "msg assistant"]
    history = []
    for (_, user), (_, reply) in zip(result["messages"][::2], result["messages"][1::2]):
        history.append({"role": "user", "content": user})
        ids = service.prompter.chat_ids(history)
        stops = service.prompter.stop_ids(True)
        out = generate(service.engine.model, torch.tensor([ids]), max_new_tokens=12, temperature=0, stop_token_ids=stops)
        want = service.engine.tokenizer.decode([t for t in out.responses[0][out.response_mask[0].bool()].tolist()
                                                if t not in stops], skip_special_tokens=True)
        assert reply == want
        history.append({"role": "assistant", "content": reply})
