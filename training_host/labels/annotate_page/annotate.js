// The weak-label annotation page: boxes, rotated boxes and a "bad" tag per image, saved after every change.
// Coordinates are kept in pixels of the original image (the label file's unit); the canvas only scales them.
"use strict";

const MARGIN = 28;          // css px around the image, room for the rotation handle
const HANDLE_GAP = 22;      // css px from a shape's top edge to its rotation handle
const HANDLE_R = 7;         // css px, handle radius
const MIN_DRAG = 4;         // css px: a shorter drag is a click
const $ = (id) => document.getElementById(id);

const S = {
  images: [],               // {key, model, dirty, version}
  index: -1,
  img: null, imgKey: null, W: 0, H: 0,
  view: { scale: 1, ox: 0, oy: 0 },
  mode: "box",
  selected: -1,
  drag: null,               // {kind: "draw"|"move"|"rotate", ...}
  rotPoints: [],            // rotated box in progress (image px)
  pointer: null,            // last pointer position (image px)
  heat: false, heatAvailable: false, heatCache: new Map(),
  undo: [],
  saving: false, savePending: false, lastSaveFailed: false,
};

// ------------------------------------------------------------------------------------------------ label model
function toModel(entry) {
  const m = { shapes: [], tag: false, blocks: undefined };
  if (!entry) return m;
  for (const b of entry.boxes || []) m.shapes.push({ t: "box", x: b[0], y: b[1], w: b[2], h: b[3] });
  for (const r of entry.rotated_boxes || []) m.shapes.push({ t: "rot", cx: r[0], cy: r[1], w: r[2], h: r[3], a: r[4] });
  m.tag = entry.tag !== undefined;
  if (entry.blocks !== undefined) m.blocks = entry.blocks;
  return m;
}

const r2 = (v) => Math.round(v * 100) / 100;

function toEntry(m) {
  const e = {};
  const boxes = m.shapes.filter((s) => s.t === "box").map((s) => [r2(s.x), r2(s.y), r2(s.w), r2(s.h)]);
  const rots = m.shapes.filter((s) => s.t === "rot").map((s) => [r2(s.cx), r2(s.cy), r2(s.w), r2(s.h), r2(s.a)]);
  if (boxes.length) e.boxes = boxes;
  if (rots.length) e.rotated_boxes = rots;
  if (m.tag) e.tag = "bad";
  if (m.blocks !== undefined) e.blocks = m.blocks;
  return Object.keys(e).length ? e : null;
}

const clone = (m) => JSON.parse(JSON.stringify(m));
const current = () => S.images[S.index];

function summary(m) {
  if (m.blocks !== undefined) return { text: "blocks", cls: "boxes" };
  const nb = m.shapes.filter((s) => s.t === "box").length;
  const nr = m.shapes.length - nb;
  const parts = [];
  if (nb) parts.push(`${nb} box${nb > 1 ? "es" : ""}`);
  if (nr) parts.push(`${nr} rot`);
  if (parts.length) return { text: parts.join(", ") + (m.tag ? ", bad" : ""), cls: "boxes" };
  if (m.tag) return { text: "bad", cls: "bad" };
  return { text: "—", cls: "none" };
}

// ------------------------------------------------------------------------------------------------ geometry
function toImage(evt) {
  const rect = $("canvas").getBoundingClientRect();
  const { scale, ox, oy } = S.view;
  return { x: (evt.clientX - rect.left - ox) / scale, y: (evt.clientY - rect.top - oy) / scale };
}

const clampX = (x) => Math.min(Math.max(x, 0), S.W);
const clampY = (y) => Math.min(Math.max(y, 0), S.H);

function normAngle(a) {
  // a rectangle is the same after half a turn: keep the angle in (-90, 90]
  while (a > 90) a -= 180;
  while (a <= -90) a += 180;
  return a;
}

function rotCorners(s) {
  // OpenCV's boxPoints convention: the width runs along (cos a, sin a) in image coordinates (y down)
  const a = (s.a * Math.PI) / 180, c = Math.cos(a), n = Math.sin(a);
  const u = [c * s.w / 2, n * s.w / 2], v = [-n * s.h / 2, c * s.h / 2];
  return [[-1, -1], [1, -1], [1, 1], [-1, 1]].map(([i, j]) => [s.cx + i * u[0] + j * v[0], s.cy + i * u[1] + j * v[1]]);
}

function contains(s, p, tol) {
  if (s.t === "box") return p.x >= s.x - tol && p.x <= s.x + s.w + tol && p.y >= s.y - tol && p.y <= s.y + s.h + tol;
  const a = (s.a * Math.PI) / 180, dx = p.x - s.cx, dy = p.y - s.cy;
  const lx = dx * Math.cos(a) + dy * Math.sin(a), ly = -dx * Math.sin(a) + dy * Math.cos(a);
  return Math.abs(lx) <= s.w / 2 + tol && Math.abs(ly) <= s.h / 2 + tol;
}

function centreOf(s) { return s.t === "box" ? { x: s.x + s.w / 2, y: s.y + s.h / 2 } : { x: s.cx, y: s.cy }; }

function handleOf(s) {
  // the rotation handle sits beyond the shape's "top" side (opposite to its height axis)
  const a = s.t === "rot" ? (s.a * Math.PI) / 180 : 0;
  const c = centreOf(s), d = s.h / 2 + HANDLE_GAP / S.view.scale;
  return { x: c.x + Math.sin(a) * d, y: c.y - Math.cos(a) * d };
}

function hitShape(p) {
  const shapes = current().model.shapes, tol = 3 / S.view.scale;
  if (S.selected >= 0 && contains(shapes[S.selected], p, tol)) return S.selected;
  let best = -1, bestArea = Infinity;
  shapes.forEach((s, i) => {
    if (contains(s, p, tol) && s.w * s.h < bestArea) { best = i; bestArea = s.w * s.h; }
  });
  return best;
}

function onHandle(p) {
  if (S.selected < 0) return false;
  const h = handleOf(current().model.shapes[S.selected]);
  return Math.hypot(p.x - h.x, p.y - h.y) * S.view.scale <= HANDLE_R + 3;
}

function rotFromClicks(p1, p2, p3) {
  const len = Math.hypot(p2.x - p1.x, p2.y - p1.y);
  if (len < 1e-6) return null;
  const u = { x: (p2.x - p1.x) / len, y: (p2.y - p1.y) / len };
  const d = u.x * (p3.y - p1.y) - u.y * (p3.x - p1.x);  // signed distance of the third click from the side
  const cx = (p1.x + p2.x) / 2 - u.y * d / 2, cy = (p1.y + p2.y) / 2 + u.x * d / 2;
  return { t: "rot", cx, cy, w: len, h: Math.abs(d), a: normAngle((Math.atan2(u.y, u.x) * 180) / Math.PI) };
}

function keepCentreInside(s) {
  // the loader wants a rotated box's centre inside the image, a box at least partly inside: keep boxes whole
  if (s.t === "rot") { s.cx = clampX(s.cx); s.cy = clampY(s.cy); return; }
  s.x = Math.min(Math.max(s.x, 0), Math.max(S.W - s.w, 0));
  s.y = Math.min(Math.max(s.y, 0), Math.max(S.H - s.h, 0));
}

// ------------------------------------------------------------------------------------------------ drawing
function layout() {
  const canvas = $("canvas"), stage = $("stage"), dpr = window.devicePixelRatio || 1;
  const cw = stage.clientWidth, ch = stage.clientHeight;
  canvas.width = Math.round(cw * dpr);
  canvas.height = Math.round(ch * dpr);
  if (S.W && S.H) {
    const scale = Math.max(Math.min((cw - 2 * MARGIN) / S.W, (ch - 2 * MARGIN) / S.H), 0.01);
    S.view = { scale, ox: (cw - S.W * scale) / 2, oy: (ch - S.H * scale) / 2 };
  }
  Object.assign(canvas.dataset, { scale: S.view.scale, ox: S.view.ox, oy: S.view.oy, width: S.W, height: S.H });
  render();
}

function pathShape(ctx, s) {
  const { scale, ox, oy } = S.view;
  ctx.beginPath();
  if (s.t === "box") {
    ctx.rect(ox + s.x * scale, oy + s.y * scale, s.w * scale, s.h * scale);
  } else {
    rotCorners(s).forEach(([x, y], i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, ox + x * scale, oy + y * scale));
    ctx.closePath();
  }
}

function render() {
  const canvas = $("canvas"), ctx = canvas.getContext("2d"), dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const im = current();
  if (!im || !S.img || S.imgKey !== im.key) return;
  const { scale, ox, oy } = S.view;
  ctx.imageSmoothingEnabled = scale < 2;
  ctx.drawImage(S.img, ox, oy, S.W * scale, S.H * scale);
  const heat = S.heat ? S.heatCache.get(im.key) : null;
  if (heat && heat.bitmap) {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(heat.bitmap, ox, oy, S.W * scale, S.H * scale);
  }
  canvas.dataset.heat = heat && heat.bitmap ? "shown" : "off";
  if (im.model.tag) {
    ctx.strokeStyle = "#d62d2d";
    ctx.lineWidth = 4;
    ctx.strokeRect(ox - 3, oy - 3, S.W * scale + 6, S.H * scale + 6);
  }
  im.model.shapes.forEach((s, i) => {
    const sel = i === S.selected;
    pathShape(ctx, s);
    ctx.fillStyle = sel ? "rgba(255,214,10,0.18)" : "rgba(255,159,28,0.10)";
    ctx.fill();
    ctx.lineWidth = sel ? 3 : 2;
    ctx.strokeStyle = sel ? "#ffd60a" : s.t === "box" ? "#ff9f1c" : "#39d0ff";
    ctx.stroke();
    const c = centreOf(s);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(String(i + 1), ox + c.x * scale - 3, oy + c.y * scale + 4);
    if (sel) {
      const h = handleOf(s), top = s.t === "rot" ? rotCorners(s) : null;
      const from = top ? { x: (top[0][0] + top[1][0]) / 2, y: (top[0][1] + top[1][1]) / 2 } : { x: c.x, y: s.y };
      ctx.beginPath();
      ctx.moveTo(ox + from.x * scale, oy + from.y * scale);
      ctx.lineTo(ox + h.x * scale, oy + h.y * scale);
      ctx.stroke();
      ctx.beginPath();
      ctx.arc(ox + h.x * scale, oy + h.y * scale, HANDLE_R, 0, 2 * Math.PI);
      ctx.fill();
    }
  });
  // shapes in progress
  ctx.setLineDash([6, 4]);
  ctx.strokeStyle = "#ffffff";
  ctx.lineWidth = 1.5;
  if (S.drag && S.drag.kind === "draw" && S.drag.moved) {
    pathShape(ctx, drawnBox(S.drag.p0, S.drag.p1));
    ctx.stroke();
  }
  if (S.mode === "rot" && S.rotPoints.length && S.pointer) {
    const [p1, p2] = S.rotPoints;
    if (S.rotPoints.length === 1) {
      ctx.beginPath();
      ctx.moveTo(ox + p1.x * scale, oy + p1.y * scale);
      ctx.lineTo(ox + S.pointer.x * scale, oy + S.pointer.y * scale);
      ctx.stroke();
    } else {
      const s = rotFromClicks(p1, p2, S.pointer);
      if (s && s.h > 0) { pathShape(ctx, s); ctx.stroke(); }
    }
  }
  ctx.setLineDash([]);
  canvas.dataset.ready = im.key;
  canvas.dataset.shapes = String(im.model.shapes.length);
}

function drawnBox(p0, p1) {
  const x0 = clampX(Math.min(p0.x, p1.x)), x1 = clampX(Math.max(p0.x, p1.x));
  const y0 = clampY(Math.min(p0.y, p1.y)), y1 = clampY(Math.max(p0.y, p1.y));
  return { t: "box", x: x0, y: y0, w: x1 - x0, h: y1 - y0 };
}

// ------------------------------------------------------------------------------------------------ side panels
function refreshList() {
  const list = $("image-list");
  let labelled = 0;
  S.images.forEach((im, i) => {
    const li = list.children[i], sm = summary(im.model), badge = li.querySelector(".badge");
    if (sm.cls !== "none") labelled += 1;
    badge.textContent = sm.text;
    badge.className = `badge ${sm.cls}${im.dirty ? " dirty" : ""}`;
    li.classList.toggle("current", i === S.index);
    li.dataset.label = sm.cls;
  });
  $("progress").textContent = `${labelled} of ${S.images.length} images labelled`;
}

function refreshSide() {
  const im = current();
  if (!im) return;
  const m = im.model, sm = summary(m);
  $("key").textContent = `${S.index + 1}/${S.images.length}  ${im.key}`;
  $("label-kind").textContent = sm.text;
  $("label-kind").className = `badge ${sm.cls}`;
  $("size").textContent = S.W ? `${S.W}×${S.H} px` : "";
  $("blocks-note").classList.toggle("hidden", m.blocks === undefined);
  const ol = $("shapes");
  ol.replaceChildren();
  m.shapes.forEach((s, i) => {
    const li = document.createElement("li");
    li.textContent = s.t === "box"
      ? `box x ${r2(s.x)}, y ${r2(s.y)}, ${r2(s.w)}×${r2(s.h)}`
      : `rotated centre ${r2(s.cx)}, ${r2(s.cy)}, ${r2(s.w)}×${r2(s.h)} at ${r2(s.a)}°`;
    li.classList.toggle("selected", i === S.selected);
    li.addEventListener("click", () => { S.selected = i; refreshSide(); render(); });
    ol.appendChild(li);
  });
  if (m.tag) {
    const li = document.createElement("li");
    li.textContent = "tag: bad";
    ol.appendChild(li);
  }
  $("tag-bad").classList.toggle("active", m.tag);
  $("tool-box").classList.toggle("active", S.mode === "box");
  $("tool-rot").classList.toggle("active", S.mode === "rot");
  $("heat").classList.toggle("active", S.heat);
  $("delete").disabled = S.selected < 0;
  $("undo").disabled = !S.undo.length;
  $("mode-hint").textContent = S.mode === "rot"
    ? ["rotated box: click the first corner of a side", "click the other end of that side",
      "click to set the depth"][S.rotPoints.length] : "";
  refreshList();
}

function showBanner(text) {
  $("banner").textContent = text;
  $("banner").classList.toggle("hidden", !text);
}

// ------------------------------------------------------------------------------------------------ changes + saving
function change(mutate, key) {
  const im = key === undefined ? current() : S.images.find((x) => x.key === key);
  const before = clone(im.model);
  if (mutate(im.model) === false) return;
  commit(im, before);
}

function commit(im, before) {
  if (JSON.stringify(before) === JSON.stringify(im.model)) return;
  S.undo.push({ key: im.key, before });
  if (S.undo.length > 500) S.undo.shift();
  im.dirty = true;
  im.version += 1;
  refreshSide();
  render();
  saveNow();
}

function setSaveState(state, text, detail) {
  const pill = $("save-state");
  pill.dataset.state = state;
  pill.textContent = text;
  if (detail !== undefined) $("save-detail").textContent = detail;
}

async function saveNow() {
  if (S.saving) { S.savePending = true; return; }
  const dirty = S.images.filter((im) => im.dirty);
  if (!dirty.length) {
    if (!S.lastSaveFailed) setSaveState("saved", `saved ${new Date().toLocaleTimeString()}`);
    return;
  }
  S.saving = true;
  S.savePending = false;
  const sent = dirty.map((im) => [im, im.version]);
  const body = { images: Object.fromEntries(dirty.map((im) => [im.key, toEntry(im.model)])) };
  setSaveState("saving", "saving…");
  let ok = false;
  try {
    const r = await fetch("api/save", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    let res;
    try { res = await r.json(); } catch (e) { res = { saved: false, message: `not saved: HTTP ${r.status}` }; }
    ok = r.ok && res.saved;
    if (ok) {
      for (const [im, v] of sent) if (im.version === v) im.dirty = false;
      S.lastSaveFailed = false;
      showBanner("");
      const warn = (res.warnings || []).length ? `\nwarnings:\n${res.warnings.join("\n")}` : "";
      setSaveState("saved", `saved ${new Date().toLocaleTimeString()}`, res.message + warn);
    } else {
      fail(res.message || `not saved: HTTP ${r.status}`, res.problems || []);
    }
  } catch (e) {
    fail(`not saved: the server did not answer (${e.message}); is weakrest-train labels annotate still running?`, []);
  }
  S.saving = false;
  refreshList();
  if (S.savePending && ok) saveNow();
  else if (S.savePending) S.savePending = false;
}

function fail(message, problems) {
  S.lastSaveFailed = true;
  const shown = problems.slice(0, 10).join("\n");
  showBanner(`${message}${shown ? "\n" + shown : ""}\nYour labels are kept in this page; fix the shape or press ` +
    "Ctrl+S to retry.");
  setSaveState("failed", "NOT SAVED", message);
}

// ------------------------------------------------------------------------------------------------ navigation
function go(i) {
  if (!S.images.length) return;
  i = Math.min(Math.max(i, 0), S.images.length - 1);
  S.index = i;
  S.selected = -1;
  S.rotPoints = [];
  S.drag = null;
  const im = current();
  refreshSide();
  const li = $("image-list").children[i];
  if (li) li.scrollIntoView({ block: "nearest" });
  $("canvas").dataset.ready = "";
  $("loading").classList.remove("hidden");
  const img = new Image();
  img.onload = () => {
    if (current().key !== im.key) return;
    S.img = img;
    S.imgKey = im.key;
    S.W = img.naturalWidth;
    S.H = img.naturalHeight;
    $("loading").classList.add("hidden");
    layout();
    refreshSide();
    if (S.heat) loadHeat(im.key);
    const next = S.images[i + 1];
    if (next) new Image().src = imageUrl(next.key);  // the next image is usually wanted next
  };
  img.onerror = () => {
    if (current().key !== im.key) return;
    $("loading").classList.add("hidden");
    showBanner(`cannot load the image ${im.key}`);
  };
  img.src = imageUrl(im.key);
}

const imageUrl = (key) => `api/image?key=${encodeURIComponent(key)}`;

async function loadHeat(key) {
  if (!S.heatAvailable) {
    $("heat-info").textContent = "no heatmap: start with --bundle BUNDLE";
    return;
  }
  const hit = S.heatCache.get(key);
  if (hit) { showHeatInfo(hit); return; }
  S.heatCache.set(key, { loading: true });
  $("heat-info").textContent = "computing heatmap…";
  try {
    const r = await fetch(`api/heatmap?key=${encodeURIComponent(key)}`);
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `HTTP ${r.status}`);
    const entry = { bitmap: await createImageBitmap(await r.blob()), score: r.headers.get("X-Score"),
      threshold: r.headers.get("X-Threshold"), verdict: r.headers.get("X-Verdict") };
    S.heatCache.set(key, entry);
    if (current().key === key) { showHeatInfo(entry); render(); }
  } catch (e) {
    S.heatCache.delete(key);
    if (current().key === key) $("heat-info").textContent = `no heatmap: ${e.message}`;
  }
}

function showHeatInfo(h) {
  $("heat-info").textContent = !S.heat ? "" : h.loading ? "computing heatmap…"
    : `heatmap: score ${h.score} (threshold ${h.threshold}, ${h.verdict})`;
}

function toggleHeat() {
  S.heat = !S.heat;
  if (S.heat) loadHeat(current().key); else $("heat-info").textContent = "";
  refreshSide();
  render();
}

function setMode(mode) {
  S.mode = mode;
  S.rotPoints = [];
  refreshSide();
  render();
}

// ------------------------------------------------------------------------------------------------ actions
function deleteSelected() {
  if (S.selected < 0) return;
  const i = S.selected;
  S.selected = -1;
  change((m) => { m.shapes.splice(i, 1); });
  refreshSide();
  render();
}

function toggleBad() { change((m) => { m.tag = !m.tag; }); }

function markGood() {
  const m = current().model;
  const n = m.shapes.length;
  S.selected = -1;
  change((mm) => { mm.shapes = []; mm.tag = false; mm.blocks = undefined; });
  if (n) $("save-detail").textContent = `marked good: ${n} shape(s) removed (Ctrl+Z undoes)`;
}

function undo() {
  const u = S.undo.pop();
  if (!u) return;
  const i = S.images.findIndex((x) => x.key === u.key);
  const im = S.images[i];
  im.model = u.before;
  im.dirty = true;
  im.version += 1;
  if (i !== S.index) go(i); else { S.selected = -1; refreshSide(); render(); }
  saveNow();
}

// ------------------------------------------------------------------------------------------------ pointer
function onPointerDown(evt) {
  if (evt.button !== 0 || !S.img || S.imgKey !== current().key) return;
  const canvas = $("canvas");
  canvas.focus();
  const p = toImage(evt);
  S.pointer = p;
  if (S.mode === "rot") {
    const q = { x: clampX(p.x), y: clampY(p.y) };
    S.rotPoints.push(q);
    if (S.rotPoints.length === 3) {
      const s = rotFromClicks(...S.rotPoints);
      S.rotPoints = [];
      if (s && s.w * S.view.scale >= 2 && s.h * S.view.scale >= 2) {
        keepCentreInside(s);
        change((m) => { m.shapes.push(s); });
        S.selected = current().model.shapes.length - 1;
      } else {
        $("save-detail").textContent = "rotated box too thin: three clicks, the third away from the first side";
      }
    }
    refreshSide();
    render();
    return;
  }
  canvas.setPointerCapture(evt.pointerId);
  const shapes = current().model.shapes;
  if (onHandle(p)) {
    const before = clone(current().model), s = shapes[S.selected];
    if (s.t === "box") shapes[S.selected] = { t: "rot", cx: s.x + s.w / 2, cy: s.y + s.h / 2, w: s.w, h: s.h, a: 0 };
    S.drag = { kind: "rotate", before, wasBox: s.t === "box" };
  } else {
    const hit = hitShape(p);
    if (hit >= 0) {
      S.selected = hit;
      S.drag = { kind: "move", before: clone(current().model), start: p, orig: clone(shapes[hit]), moved: false };
    } else {
      S.selected = -1;
      S.drag = { kind: "draw", p0: { x: clampX(p.x), y: clampY(p.y) }, p1: p, moved: false, startEvt: evt };
    }
  }
  refreshSide();
  render();
}

function onPointerMove(evt) {
  if (!S.img) return;
  const p = toImage(evt);
  S.pointer = p;
  const d = S.drag;
  if (!d) {
    if (S.mode === "rot" && S.rotPoints.length) render();
    let cursor = "crosshair";
    if (S.mode === "box" && onHandle(p)) cursor = "grab";
    else if (S.mode === "box" && hitShape(p) >= 0) cursor = "move";
    $("canvas").style.cursor = cursor;
    return;
  }
  const s = current().model.shapes[S.selected];
  if (d.kind === "draw") {
    d.p1 = p;
    d.moved = d.moved || Math.hypot(evt.clientX - d.startEvt.clientX, evt.clientY - d.startEvt.clientY) >= MIN_DRAG;
  } else if (d.kind === "move") {
    const dx = p.x - d.start.x, dy = p.y - d.start.y;
    d.moved = d.moved || Math.hypot(dx, dy) * S.view.scale >= 1;
    if (s.t === "box") { s.x = d.orig.x + dx; s.y = d.orig.y + dy; } else { s.cx = d.orig.cx + dx; s.cy = d.orig.cy + dy; }
    keepCentreInside(s);
  } else if (d.kind === "rotate") {
    const c = centreOf(s);
    let a = (Math.atan2(p.x - c.x, -(p.y - c.y)) * 180) / Math.PI;
    if (evt.shiftKey) a = Math.round(a / 15) * 15;
    s.a = a;  // kept as dragged so the handle follows the pointer; normalised when the drag ends
  }
  render();
}

function onPointerUp(evt) {
  const d = S.drag;
  if (!d) return;
  S.drag = null;
  const im = current();
  if (d.kind === "draw") {
    const b = drawnBox(d.p0, toImage(evt));
    if (d.moved && b.w * S.view.scale >= 2 && b.h * S.view.scale >= 2) {
      change((m) => { m.shapes.push(b); });
      S.selected = im.model.shapes.length - 1;
    }
  } else if (d.kind === "rotate") {
    const s = im.model.shapes[S.selected];
    s.a = normAngle(s.a);  // half a turn more is the same rectangle
    if (d.wasBox && Math.abs(s.a) < 0.01) im.model.shapes[S.selected] = d.before.shapes[S.selected];  // not turned
    commit(im, d.before);
  } else if (d.kind === "move" && d.moved) {
    commit(im, d.before);
  }
  refreshSide();
  render();
}

// ------------------------------------------------------------------------------------------------ keys
function onKey(evt) {
  const ctrl = evt.ctrlKey || evt.metaKey;
  const k = evt.key;
  if (ctrl && (k === "s" || k === "S")) { evt.preventDefault(); saveNow(); return; }
  if (ctrl && (k === "z" || k === "Z")) { evt.preventDefault(); undo(); return; }
  if (ctrl || evt.altKey || !current() || S.drag) return;
  const actions = {
    ArrowRight: () => go(S.index + 1), j: () => go(S.index + 1), PageDown: () => go(S.index + 1),
    ArrowLeft: () => go(S.index - 1), k: () => go(S.index - 1), PageUp: () => go(S.index - 1),
    Home: () => go(0), End: () => go(S.images.length - 1),
    a: () => setMode("box"), r: () => setMode("rot"),
    b: toggleBad, g: markGood, h: toggleHeat,
    Delete: deleteSelected, Backspace: deleteSelected,
    Escape: () => { S.rotPoints = []; S.selected = -1; refreshSide(); render(); },
  };
  const act = actions[k];
  if (act) { evt.preventDefault(); act(); }
}

// ------------------------------------------------------------------------------------------------ start
async function start() {
  let state;
  try {
    const r = await fetch("api/state");
    state = await r.json();
    if (!r.ok) throw new Error(state.error || `HTTP ${r.status}`);
  } catch (e) {
    showBanner(`cannot load the labels: ${e.message}`);
    return;
  }
  $("out").textContent = state.out;
  $("root").textContent = state.root;
  S.heatAvailable = state.heatmap;
  $("heat").disabled = !state.heatmap;
  $("heat").title = state.heatmap ? `h: heatmap of ${state.bundle} as a hint` : "start with --bundle BUNDLE";
  S.images = state.images.map((x) => ({ key: x.key, model: toModel(x.label), dirty: false, version: 0 }));
  const list = $("image-list");
  S.images.forEach((im, i) => {
    const li = document.createElement("li");
    li.dataset.key = im.key;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = im.key;
    name.title = im.key;
    const badge = document.createElement("span");
    badge.className = "badge";
    li.append(name, badge);
    li.addEventListener("click", () => go(i));
    list.appendChild(li);
  });
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", () => { S.drag = null; render(); });
  document.addEventListener("keydown", onKey);
  new ResizeObserver(() => layout()).observe($("stage"));
  $("tool-box").onclick = () => setMode("box");
  $("tool-rot").onclick = () => setMode("rot");
  $("tag-bad").onclick = toggleBad;
  $("tag-good").onclick = markGood;
  $("delete").onclick = deleteSelected;
  $("undo").onclick = undo;
  $("heat").onclick = toggleHeat;
  $("prev").onclick = () => go(S.index - 1);
  $("next").onclick = () => go(S.index + 1);
  $("save").onclick = () => saveNow();
  for (const b of document.querySelectorAll("#toolbar button")) b.addEventListener("click", () => canvas.focus());
  window.addEventListener("beforeunload", (evt) => {
    if (S.images.some((im) => im.dirty)) { evt.preventDefault(); evt.returnValue = ""; }
  });
  setSaveState("idle", "not changed", `labels in ${state.out}`);
  go(0);
}

start();
