// The page of serve.py: images dropped or picked are sent to /predict one per request (a few at a time),
// each shown with its top labels as bars, "unknown" as such, a multi-label model's labels above their
// thresholds, an unusable file's error; the heat map of the evidence on request (/explain). Nothing is
// loaded from anywhere but this server. ?reject_below=P and ?topk=K in the page's address are passed on.
"use strict";

const KEY = "imgcls-api-key";
const AT_ONCE = 4; // requests in flight: the server batches them
const state = { key: sessionStorage.getItem(KEY) || "", queue: [], running: 0, model: null };
const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function percent(p) {
  return (100 * p).toFixed(p >= 0.9995 || p < 0.0005 ? 0 : 1) + "%";
}

async function api(path, options = {}) {
  const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this server needs an API key (above)");
  }
  return response;
}

function passedOn() {
  const given = new URLSearchParams(location.search), out = new URLSearchParams();
  for (const name of ["reject_below", "topk"]) if (given.has(name)) out.set(name, given.get(name));
  const text = out.toString();
  return text ? "?" + text : "";
}

async function loadModel() {
  try {
    const response = await api("model");
    if (!response.ok) throw new Error((await response.json()).error);
    const info = await response.json();
    state.model = info;
    $("model-name").textContent = info.model;
    const calibration = info.calibration.calibrated ? `calibrated (temperature ${info.calibration.temperature.toFixed(2)})`
      : "not calibrated";
    $("model-about").textContent = `${info.classes.length} ${info.multilabel ? "labels (multi-label)" : "classes"}, ` +
      `${info.input.img_size} px, probabilities ${calibration}` +
      (info.serving.reject_below !== null ? `, "unknown" below ${info.serving.reject_below}` : "");
    $("key-form").hidden = true;
  } catch (e) {
    $("model-about").textContent = e.message;
  }
}

function bars(entries, className) {
  const box = element("div", "bars");
  for (const { label, probability } of entries) {
    const row = element("div", "bar " + className);
    row.append(element("span", "label", label), element("span", "value", percent(probability)));
    const track = element("div", "track"), fill = element("div", "fill");
    fill.style.width = (100 * probability).toFixed(2) + "%";
    track.append(fill);
    row.append(track);
    box.append(row);
  }
  return box;
}

function show(card, answer) {
  const verdict = card.querySelector(".verdict");
  card.classList.remove("waiting");
  card.classList.add(answer.status === "error" ? "error" : answer.status === "unknown" ? "unknown" : "done");
  if (answer.status === "error") {
    verdict.textContent = answer.error;
    return;
  }
  if (answer.labels) { // multi-label: every label at or above its threshold
    verdict.textContent = answer.labels.length ? answer.labels.map((a) => a.label).join(", ")
      : "no label above its threshold";
    card.append(bars(answer.labels, "present"));
    card.append(element("div", "name", "most likely:"), bars(answer.top, "top"));
  } else {
    verdict.textContent = answer.status === "unknown" ? `unknown (${answer.reason})` : answer.label;
    card.append(bars(answer.top, "top"));
  }
  const button = element("button", "explain", "Show the evidence");
  button.type = "button";
  button.addEventListener("click", () => explain(card, button));
  card.append(button);
}

async function explain(card, button) {
  button.disabled = true;
  const form = new FormData();
  form.append("file", card.file, card.file.name);
  try {
    const response = await api("explain", { method: "POST", body: form });
    if (!response.ok) throw new Error((await response.json()).error);
    const figure = element("figure", "heat"), img = element("img");
    img.alt = "heat map of the evidence";
    img.src = URL.createObjectURL(await response.blob());
    const label = response.headers.get("X-Label"), found = response.headers.get("X-Evidence-Found") === "true";
    figure.append(img, element("figcaption", "", `evidence for ${label} (${response.headers.get("X-Method")})` +
      (found ? "" : ": none found")));
    button.replaceWith(figure);
  } catch (e) {
    button.disabled = false;
    button.textContent = "Show the evidence (failed: " + e.message + ")";
  }
}

async function predict(card) {
  const form = new FormData();
  form.append("file", card.file, card.file.name);
  try {
    const response = await api("predict" + passedOn(), { method: "POST", body: form });
    const body = await response.json();
    if (body.results) show(card, body.results[0]);
    else show(card, { status: "error", error: body.error });
  } catch (e) {
    show(card, { status: "error", error: e.message });
  }
}

function pump() {
  while (state.running < AT_ONCE && state.queue.length) {
    const card = state.queue.shift();
    state.running++;
    predict(card).finally(() => { state.running--; pump(); });
  }
}

function add(files) {
  for (const file of files) {
    const card = element("li", "card waiting");
    card.file = file;
    const img = element("img");
    img.alt = file.name;
    img.addEventListener("error", () => img.remove()); // not a picture the browser shows: the answer says why
    img.src = URL.createObjectURL(file);
    card.append(img, element("div", "name", file.name), element("div", "verdict", "…"));
    $("results").prepend(card);
    state.queue.push(card);
  }
  $("message").textContent = `${files.length} image(s) sent`;
  pump();
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { add(Array.from(e.target.files)); e.target.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  // the whole page takes a drop: a file dropped beside the box is not opened by the browser in our place
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) add(Array.from(e.dataTransfer.files));
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem(KEY, state.key);
    loadModel();
  });
  loadModel();
}

setUp();
