// The page of `fastsamclip serve`: choose or drop a picture, point at anything, see its mask and its name.
//
// One backbone pass per picture: the picture goes once to POST /v1/image, which keeps its pass under an
// id; every hover, click, box, "Everything" and semantic map afterwards names that id and costs only
// its head (a hover: SAM's mask decoder and the pooling of the per-patch CLIP embeddings over the mask,
// on the server). One hover request is in flight at a time; the pointer's latest position is sent when
// it returns, so the masks follow the pointer without a queue building up.
//
// For the tests and for anyone curious, window.fastsamclip holds the state: the image id, the masks on
// screen, and hoverTimes, the milliseconds from each pointer move that was sent to its mask on screen
// (the move event's timestamp to the next animation frame after drawing).
"use strict";

const DEFAULT_LABELS = [
  "person", "face", "hand", "hair", "dog", "cat", "bird", "horse", "cow", "sheep", "car", "bicycle", "motorcycle",
  "bus", "truck", "train", "boat", "airplane", "traffic light", "road", "sidewalk", "building", "house", "window",
  "door", "wall", "floor", "ceiling", "roof", "fence", "tree", "plant", "flower", "grass", "sky", "cloud",
  "mountain", "rock", "sand", "water", "snow", "table", "chair", "sofa", "bed", "lamp", "book", "bottle", "cup",
  "plate", "bowl", "food", "fruit", "laptop", "phone", "television", "keyboard", "clock", "bag", "shoe", "hat",
  "shirt", "toy", "sign", "box", "paper",
];
const KEY_STORAGE = "fastsamclip-api-key";
const DRAG_PX = 5;  // pointer travel (screen pixels) that makes a press a box rather than a point

const $ = (id) => document.getElementById(id);
const state = window.fastsamclip = {
  file: null, imageId: null, width: 0, height: 0, masks: [], hover: null, hoverTimes: [], points: [], box: null,
  endpoints: [], busy: 0,
};

// ------------------------------------------------------------------ the API
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers["X-API-Key"] = key;
  let init = {method: "GET", headers};
  if (body instanceof FormData) init = {method: "POST", headers, body};
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init = {method: "POST", headers, body: JSON.stringify(body)};
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the server cannot be reached (${e.message}); is fastsamclip serve still running?`);
  }
  const text = await r.text();
  let data;
  try { data = JSON.parse(text); } catch (e) { data = {error: text || r.statusText}; }
  if (!r.ok) {
    if (r.status === 401) showKeyForm();
    throw new ApiError(r.status, data.error || `${r.status} ${r.statusText}`);
  }
  return data;
}

// A request on the current picture; when the server no longer keeps it (restarted, or it kept newer
// ones since), the picture is sent again once and the request repeated.
async function onImage(path, body) {
  try {
    return await api(path, {...body, image_id: state.imageId});
  } catch (e) {
    if (e.status !== 404 || !state.file) throw e;
    await upload(state.file);
    return api(path, {...body, image_id: state.imageId});
  }
}

function labels() {
  const seen = new Set();
  return $("labels").value.split("\n").map((s) => s.trim()).filter((s) => s && !seen.has(s) && seen.add(s));
}

const templates = () => $("templates").value;

// ------------------------------------------------------------------ messages
function say(text) { $("status").textContent = text; }

function showError(what, e) {
  const m = $("message");
  m.textContent = `${what}: ${e.message}`;
  m.hidden = false;
  say(what);
}

function clearError() { $("message").hidden = true; $("message").textContent = ""; }

function showKeyForm() {
  $("key-form").hidden = false;
  $("key").focus();
}

async function busy(what, fn) {
  state.busy++;
  say(what + "...");
  try {
    await fn();
    clearError();
  } catch (e) {
    showError(`${what} failed`, e);
  } finally {
    state.busy--;
  }
}

// ------------------------------------------------------------------ the picture
async function upload(file) {
  const form = new FormData();
  form.append("image", file, file.name || "image");
  const names = labels();
  if (names.length) form.append("labels", JSON.stringify(names));
  form.append("templates", JSON.stringify(templates()));
  const answer = await api("/v1/image", form);
  state.imageId = answer.image_id;
  return answer;
}

// A new picture: sent once (its pass kept by the server), then shown. A file the server refuses
// leaves the page as it was, with the server's reason above it.
async function choose(file) {
  if (!file) return;
  await busy("Reading the picture", async () => {
    const t0 = performance.now();
    const answer = await upload(file);
    state.file = file;
    [state.height, state.width] = answer.size;
    const bitmap = await createImageBitmap(file);
    const pic = $("picture"), over = $("overlay");
    pic.width = over.width = state.width;
    pic.height = over.height = state.height;
    pic.getContext("2d").drawImage(bitmap, 0, 0, state.width, state.height);
    pic.hidden = over.hidden = false;
    $("drop").hidden = true;
    $("stage").classList.add("loaded");
    for (const id of ["everything", "semantic", "clear"]) $(id).disabled = false;
    $("concepts-form").hidden = !state.endpoints.includes("/v1/concepts");
    reset();
    say(`${state.width} x ${state.height} px, one backbone pass: ${(performance.now() - t0).toFixed(0)} ms. ` +
        "Point at anything.");
  });
}

// ------------------------------------------------------------------ drawing
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0],
  [170, 255, 195], [128, 128, 0], [0, 0, 128], [128, 128, 128],
];
const HOVER_COLOR = [47, 111, 237, 140];
const ALPHA = 120;

// masks: [{rle, label, score}] drawn on the overlay with their names; the hover mask on top.
function draw() {
  const over = $("overlay");
  const ctx = over.getContext("2d");
  const img = ctx.createImageData(over.width, over.height);
  state.masks.forEach((m, i) => RLE.paint(m.rle, img.data, [...PALETTE[i % PALETTE.length], ALPHA]));
  if (state.hover) RLE.paint(state.hover.rle, img.data, HOVER_COLOR);
  ctx.putImageData(img, 0, 0);
  // Names, points and the box in screen pixels, whatever the picture's size on screen.
  // Points and the box in screen pixels, whatever the picture's size on screen.
  const px = 14 * over.width / (over.getBoundingClientRect().width || over.width);
  // Names as page text over the picture (crisp at any zoom), at the centre of each mask's box.
  const names = $("names");
  names.replaceChildren();
  for (const m of state.masks) {
    if (!m.label) continue;
    const [x, y, w, h] = m.bbox;
    const tag = document.createElement("span");
    tag.textContent = m.score === undefined ? m.label : `${m.label} ${(100 * m.score).toFixed(0)}%`;
    tag.style.left = `${100 * (x + w / 2) / over.width}%`;
    tag.style.top = `${100 * (y + h / 2) / over.height}%`;
    names.append(tag);
  }
  for (const p of state.points) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, px / 2.5, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === 1 ? "#23c552" : "#e23b3b";
    ctx.fill();
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  if (state.box) {
    const [x0, y0, x1, y1] = state.box;
    ctx.lineWidth = Math.max(2, px / 6);
    ctx.strokeStyle = "#2f6fed";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  over.dataset.masks = String(state.masks.length);
  $("download-png").disabled = $("download-coco").disabled = state.masks.length === 0;
}

function setMasks(masks, what) {
  state.masks = masks.map((m) => ({...m, ...RLE.measure(m.rle)}));
  const legend = $("legend");
  legend.replaceChildren();
  const named = new Map();
  state.masks.forEach((m, i) => { if (m.label && !named.has(m.label)) named.set(m.label, PALETTE[i % PALETTE.length]); });
  for (const [label, color] of named) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${color.join(",")})`;
    li.append(sw, document.createTextNode(label));
    legend.append(li);
  }
  $("count").textContent = what === undefined ? "" : `${state.masks.length} ${what}`;
  draw();
}

function reset() {
  state.points = [];
  state.box = null;
  state.hover = null;
  $("tip").hidden = true;
  setMasks([]);
}

// ------------------------------------------------------------------ pointing
function imageXY(ev) {
  const r = $("overlay").getBoundingClientRect();
  const x = Math.min(Math.max(ev.clientX - r.left, 0), r.width - 1) * state.width / r.width;
  const y = Math.min(Math.max(ev.clientY - r.top, 0), r.height - 1) * state.height / r.height;
  return [x, y];
}

let hoverInFlight = false, hoverNext = null, press = null;

async function hover(move) {
  if (hoverInFlight) { hoverNext = move; return; }
  hoverInFlight = true;
  try {
    const answer = await onImage("/v1/segment", {points: [[move.xy]], multimask_output: false, labels: labels(),
                                                 templates: templates()});
    if (!press) {
      state.hover = {rle: answer.masks[0][0], label: answer.label[0][0], score: answer.label_score[0][0]};
      draw();
      const tip = $("tip"), r = $("overlay").getBoundingClientRect(), s = r.width / state.width;
      tip.textContent = `${state.hover.label} ${(100 * state.hover.score).toFixed(0)}%`;
      tip.style.left = `${move.xy[0] * s}px`;
      tip.style.top = `${move.xy[1] * s}px`;
      tip.hidden = false;
      requestAnimationFrame(() => {
        state.hoverTimes.push(performance.now() - move.t);
        const t = [...state.hoverTimes].sort((a, b) => a - b), m = t.length >> 1;
        const p50 = t.length % 2 ? t[m] : (t[m - 1] + t[m]) / 2;
        $("latency").textContent = `hover to mask: p50 ${p50.toFixed(0)} ms over ${t.length} moves`;
      });
    }
    clearError();
  } catch (e) {
    showError("Pointing failed", e);
  } finally {
    hoverInFlight = false;
    if (hoverNext) { const next = hoverNext; hoverNext = null; hover(next); }
  }
}

async function prompt() {
  const body = {multimask_output: false, labels: labels(), templates: templates()};
  if (state.points.length) {
    body.points = [state.points.map((p) => [p.x, p.y])];
    body.point_labels = [state.points.map((p) => p.label)];
  }
  if (state.box) body.boxes = [state.box];
  await busy("Segmenting", async () => {
    const a = await onImage("/v1/segment", body);
    setMasks([{rle: a.masks[0][0], label: a.label[0][0], score: a.label_score[0][0]}], "mask from your prompts");
    say("Click: a point on it; shift-click: a point off it; drag: a box; Esc: clear.");
  });
}

function setupPointer() {
  const over = $("overlay");
  over.addEventListener("mousemove", (ev) => {
    if (!state.imageId || press) return;
    hover({xy: imageXY(ev), t: ev.timeStamp});
  });
  over.addEventListener("mouseleave", () => { state.hover = null; $("tip").hidden = true; if (state.imageId) draw(); });
  over.addEventListener("mousedown", (ev) => {
    if (!state.imageId || ev.button !== 0) return;
    press = {xy: imageXY(ev), cx: ev.clientX, cy: ev.clientY, shift: ev.shiftKey};
    ev.preventDefault();
  });
  window.addEventListener("mouseup", (ev) => {
    if (!press) return;
    const p = press;
    press = null;
    state.hover = null;
    $("tip").hidden = true;
    if (Math.hypot(ev.clientX - p.cx, ev.clientY - p.cy) < DRAG_PX) {
      state.points.push({x: p.xy[0], y: p.xy[1], label: p.shift ? 0 : 1});
    } else {
      const q = imageXY(ev);
      state.box = [Math.min(p.xy[0], q[0]), Math.min(p.xy[1], q[1]), Math.max(p.xy[0], q[0]), Math.max(p.xy[1], q[1])];
    }
    prompt();
  });
  window.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && state.imageId) reset(); });
}

// ------------------------------------------------------------------ whole-picture views
async function everything() {
  await busy("Finding every mask", async () => {
    // SamAutomaticMaskGenerator's two thresholds (its defaults in the page); the server checks them.
    const a = await onImage("/v1/everything", {labels: labels(), templates: templates(),
                                               pred_iou_thresh: Number($("pred-iou").value),
                                               stability_score_thresh: Number($("stability").value)});
    state.points = []; state.box = null; state.hover = null;
    setMasks(a.masks.map((m) => ({rle: m.segmentation, label: m.label, score: m.label_score})), "masks");
    say(`${a.count} masks, each named.`);
  });
}

async function semantic() {
  await busy("Mapping the labels", async () => {
    const a = await onImage("/v1/semantic", {labels: labels(), templates: templates(), mode: "composed",
                                             threshold: Number($("semantic-threshold").value)});
    state.points = []; state.box = null; state.hover = null;
    setMasks(a.present.map((name) => ({rle: a.masks[name], label: name})), "labels present");
    say(`Semantic map: ${a.present.length} of ${a.labels.length} labels present.`);
  });
}

async function concepts(text) {
  await busy(`Finding every ${text}`, async () => {
    const a = await onImage("/v1/concepts", {phrases: [text]});
    state.points = []; state.box = null; state.hover = null;
    setMasks(a.instances.map((m) => ({rle: m.segmentation, label: m.phrase, score: m.score})), `instances of ${text}`);
  });
}

// ------------------------------------------------------------------ downloads
function baseName() { return (state.file && state.file.name ? state.file.name.replace(/\.[^.]*$/, "") : "image"); }

function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function downloadPng() {
  // The masks at the picture's size, each in its colour, transparent elsewhere.
  const c = document.createElement("canvas");
  c.width = state.width; c.height = state.height;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(c.width, c.height);
  state.masks.forEach((m, i) => RLE.paint(m.rle, img.data, [...PALETTE[i % PALETTE.length], 255]));
  ctx.putImageData(img, 0, 0);
  c.toBlob((blob) => save(blob, `${baseName()}.masks.png`), "image/png");
}

function downloadCoco() {
  const names = [...new Set(state.masks.map((m) => m.label || "object"))];
  const coco = {
    images: [{id: 1, file_name: state.file ? state.file.name : "image", width: state.width, height: state.height}],
    categories: names.map((name, i) => ({id: i + 1, name})),
    annotations: state.masks.map((m, i) => ({
      id: i + 1, image_id: 1, category_id: names.indexOf(m.label || "object") + 1, segmentation: m.rle,
      area: m.area, bbox: m.bbox, iscrowd: 0, ...(m.score === undefined ? {} : {score: m.score}),
    })),
  };
  save(new Blob([JSON.stringify(coco)], {type: "application/json"}), `${baseName()}.coco.json`);
}

// ------------------------------------------------------------------ start
function setup() {
  $("labels").value = DEFAULT_LABELS.join("\n");
  $("file").addEventListener("change", (ev) => choose(ev.target.files[0]));
  const stage = $("stage");
  stage.addEventListener("dragover", (ev) => { ev.preventDefault(); stage.classList.add("dragging"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (ev) => {
    ev.preventDefault();
    stage.classList.remove("dragging");
    choose(ev.dataTransfer.files[0]);
  });
  $("everything").addEventListener("click", everything);
  $("semantic").addEventListener("click", semantic);
  $("clear").addEventListener("click", reset);
  $("download-png").addEventListener("click", downloadPng);
  $("download-coco").addEventListener("click", downloadCoco);
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key").value);
    $("key-form").hidden = true;
    clearError();
    info();
  });
  $("concepts-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("concept").value.trim();
    if (text && state.imageId) concepts(text);
  });
  setupPointer();
  info();
}

async function info() {
  try {
    const answer = await api("/info");
    state.endpoints = (answer.model && answer.model.endpoints) || [];
    document.body.dataset.ready = "true";
  } catch (e) {
    if (e.status === 401) say("Enter this server's API key (at the right).");
    else showError("The server's description failed", e);
  }
}

setup();
