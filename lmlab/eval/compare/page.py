"""The judging page: HTML, script and style, kept in Python so the package needs no data files.

The server serves exactly these three documents (see :data:`ASSETS`) and
nothing from disk. The page never shows model names (judging is blind) and
inserts all model text with ``textContent``, so responses cannot inject markup.

Keyboard: the columns of keys under ``1 2 3`` choose A, B and tie -- ``1 2 3``
for overall, ``q w e`` for helpfulness, ``a s d`` for harmlessness, ``z x c``
for honesty; Enter submits once all four are chosen, Escape clears.
"""

from __future__ import annotations

#: key -> (criterion, choice); mirrored in the script below.
KEYMAP: dict[str, tuple[str, str]] = {
    **{k: ("overall", c) for k, c in zip("123", ("a", "b", "tie"))},
    **{k: ("helpfulness", c) for k, c in zip("qwe", ("a", "b", "tie"))},
    **{k: ("harmlessness", c) for k, c in zip("asd", ("a", "b", "tie"))},
    **{k: ("honesty", c) for k, c in zip("zxc", ("a", "b", "tie"))},
}

_ROWS = [("overall", "Overall", "123"), ("helpfulness", "Helpfulness", "qwe"), ("harmlessness", "Harmlessness", "asd"), ("honesty", "Honesty", "zxc")]


def _choice_rows() -> str:
    labels = ("A is better", "B is better", "Tie")
    out = []
    for crit, title, keys in _ROWS:
        buttons = "".join(
            f'<button type="button" class="choice" data-criterion="{crit}" data-choice="{choice}" aria-pressed="false">'
            f"{label} <kbd>{key}</kbd></button>"
            for choice, label, key in zip(("a", "b", "tie"), labels, keys)
        )
        out.append(f'<div class="row" id="row-{crit}"><span class="crit">{title}</span>{buttons}</div>')
    return "\n      ".join(out)


INDEX_HTML = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>lmlab compare</title>
  <link rel="stylesheet" href="/static/style.css">
</head>
<body data-state="loading">
  <header>
    <h1>Which response is better?</h1>
    <div class="progress"><progress id="progress" max="1" value="0"></progress> <span id="progress-text">0 / 0 judged</span></div>
  </header>
  <main id="judge">
    <section class="prompt"><h2>Prompt</h2><pre id="prompt"></pre></section>
    <div class="responses">
      <section><h2>Response A</h2><pre id="response-a"></pre></section>
      <section><h2>Response B</h2><pre id="response-b"></pre></section>
    </div>
    <div class="choices">
      {_choice_rows()}
    </div>
    <div class="actions">
      <button type="button" id="submit" disabled>Submit <kbd>Enter</kbd></button>
      <button type="button" id="clear">Clear <kbd>Esc</kbd></button>
      <span id="status" role="status"></span>
    </div>
    <p class="help">Keys: the column under <kbd>1</kbd> picks A, under <kbd>2</kbd> picks B, under <kbd>3</kbd> a tie
      (<kbd>1 2 3</kbd> overall, <kbd>q w e</kbd> helpfulness, <kbd>a s d</kbd> harmlessness, <kbd>z x c</kbd> honesty).</p>
  </main>
  <section id="done" hidden>
    <h2>All pairs judged &mdash; thank you.</h2>
    <table id="results"><thead><tr><th>model</th><th>games</th><th>win rate</th><th>Bradley-Terry</th><th>Elo</th></tr></thead><tbody></tbody></table>
  </section>
  <script src="/static/app.js"></script>
</body>
</html>
"""

APP_JS = r"""
"use strict";
const CRITERIA = ["overall", "helpfulness", "harmlessness", "honesty"];
const KEYS = {};
[["123", "overall"], ["qwe", "helpfulness"], ["asd", "harmlessness"], ["zxc", "honesty"]].forEach(([keys, crit]) => {
  ["a", "b", "tie"].forEach((choice, i) => { KEYS[keys[i]] = [crit, choice]; });
});
const $ = (id) => document.getElementById(id);
let current = null;
let choices = {};
let busy = false;

function setState(state) { document.body.dataset.state = state; }

async function api(path, options) {
  const response = await fetch(path, options);
  let body = {};
  try { body = await response.json(); } catch (e) { /* non-JSON error page */ }
  if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
  return body;
}

function showProgress(p) {
  $("progress").max = Math.max(1, p.total);
  $("progress").value = p.judged;
  $("progress-text").textContent = p.judged + " / " + p.total + " judged";
}

function complete() { return current !== null && CRITERIA.every((c) => choices[c]); }

function render() {
  document.querySelectorAll("button.choice").forEach((b) => {
    b.setAttribute("aria-pressed", String(choices[b.dataset.criterion] === b.dataset.choice));
  });
  $("submit").disabled = busy || !complete();
}

function choose(crit, choice) {
  if (busy || current === null) return;
  choices[crit] = choice;
  $("status").textContent = "";
  render();
}

function fmt(x, digits) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(digits); }

async function showDone() {
  current = null;
  $("judge").hidden = true;
  $("done").hidden = false;
  try {
    const res = await api("/api/results");
    const overall = res.criteria && res.criteria.overall;
    const tbody = document.querySelector("#results tbody");
    tbody.textContent = "";
    (overall ? overall.models : []).forEach((m) => {
      const tr = document.createElement("tr");
      [m.model, m.games, fmt(m.win_rate, 3), fmt(m.bt_rating, 0), fmt(m.elo, 0)].forEach((v) => {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
  } catch (e) {
    $("status").textContent = "could not load results: " + e.message;
  }
  setState("done");
}

async function loadNext() {
  busy = true;
  setState("loading");
  render();
  try {
    const data = await api("/api/next");
    showProgress(data.progress);
    if (data.done) { busy = false; await showDone(); return; }
    current = data.pair;
    choices = {};
    $("prompt").textContent = current.prompt;
    $("response-a").textContent = current.response_a;
    $("response-b").textContent = current.response_b;
    document.body.dataset.pairId = current.pair_id;
    busy = false;
    setState("ready");
  } catch (e) {
    busy = false;
    $("status").textContent = "error: " + e.message;
    setState("error");
  }
  render();
}

async function submit() {
  if (busy || !complete()) return;
  busy = true;
  setState("saving");
  render();
  const body = Object.assign({ pair_id: current.pair_id }, choices);
  try {
    const data = await api("/api/judge", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showProgress(data.progress);
    $("status").textContent = "saved";
  } catch (e) {
    $("status").textContent = "not saved: " + e.message;
  }
  busy = false;
  await loadNext();
}

document.querySelectorAll("button.choice").forEach((b) => {
  b.addEventListener("click", () => choose(b.dataset.criterion, b.dataset.choice));
});
$("submit").addEventListener("click", submit);
$("clear").addEventListener("click", () => { choices = {}; render(); });
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) return;
  if (ev.key === "Enter") { ev.preventDefault(); submit(); return; }
  if (ev.key === "Escape") { ev.preventDefault(); choices = {}; render(); return; }
  const hit = KEYS[ev.key.toLowerCase()];
  if (hit) { ev.preventDefault(); choose(hit[0], hit[1]); }
});
loadNext();
"""

STYLE_CSS = """
:root { font-family: system-ui, sans-serif; color: #1d1d1f; background: #f6f6f4; }
body { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem; }
header { display: flex; justify-content: space-between; align-items: center; gap: 1rem; }
h1 { font-size: 1.3rem; margin: 0.3rem 0; }
h2 { font-size: 0.95rem; margin: 0 0 0.4rem; color: #555; text-transform: uppercase; letter-spacing: 0.04em; }
.progress progress { width: 14rem; vertical-align: middle; }
pre { white-space: pre-wrap; word-wrap: break-word; font: 0.95rem/1.45 ui-monospace, monospace; margin: 0; }
section { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 0.8rem 1rem; }
.prompt { margin: 0.8rem 0; background: #fbfbf2; }
.responses { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.responses pre { max-height: 45vh; overflow: auto; }
.choices { margin: 1rem 0 0.5rem; display: grid; gap: 0.4rem; }
.row { display: grid; grid-template-columns: 9rem repeat(3, 10rem); gap: 0.5rem; align-items: center; }
.crit { font-weight: 600; }
button { font: inherit; padding: 0.35rem 0.6rem; border: 1px solid #bbb; border-radius: 6px; background: #fff; cursor: pointer; }
button[aria-pressed="true"] { background: #2f6fde; border-color: #2f6fde; color: #fff; }
button:disabled { opacity: 0.5; cursor: default; }
#submit { background: #1f8a4c; border-color: #1f8a4c; color: #fff; }
.actions { display: flex; gap: 0.6rem; align-items: center; }
kbd { font: 0.75rem ui-monospace, monospace; border: 1px solid #999; border-radius: 3px; padding: 0 0.25rem; background: #eee; color: #333; }
.help { color: #666; font-size: 0.85rem; }
#status { color: #555; }
table { border-collapse: collapse; }
td, th { padding: 0.25rem 0.8rem; border-bottom: 1px solid #ddd; text-align: left; }
"""

#: URL path -> (content type, body). The only documents the server will ever send besides its JSON API.
ASSETS: dict[str, tuple[str, bytes]] = {
    "/": ("text/html; charset=utf-8", INDEX_HTML.encode("utf-8")),
    "/index.html": ("text/html; charset=utf-8", INDEX_HTML.encode("utf-8")),
    "/static/app.js": ("text/javascript; charset=utf-8", APP_JS.encode("utf-8")),
    "/static/style.css": ("text/css; charset=utf-8", STYLE_CSS.encode("utf-8")),
}
