// The live operator page: one EventSource on /events (the server pushes at most ~5 small JSON events a second),
// the picture fetched as /frame.jpg?seq=N only when an event names a frame not shown yet and no other picture is
// loading, so a slow link skips frames instead of queueing them.  EventSource reconnects by itself after a
// service restart; meanwhile the page says the connection is lost.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const STALE_MS = 6000; // the server resends its state every 2 s: silence this long means the link is gone
  let lastEventAt = 0;
  let connected = false;
  let wanted = null; // seq of the newest frame an event named
  let shown = null; // seq of the frame on screen
  let loading = null; // seq of the frame being fetched
  let current = null; // the newest event
  let clockOffset = 0; // service clock minus this browser's, seconds
  const verdictOf = new Map(); // seq -> verdict of the last few events, for the picture's caption

  function showAge() {
    if (!current || typeof current.captured_at !== "number") return;
    const age = Date.now() / 1000 + clockOffset - current.captured_at;
    text("age", age < 60 ? age.toFixed(1) + " s ago" : Math.round(age / 60) + " min ago");
  }

  const text = (id, value) => {
    const el = $(id);
    const s = value === null || value === undefined || value === "" ? "—" : String(value);
    if (el.textContent !== s) el.textContent = s;
  };
  const fmt = (v, digits) => (typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "—");
  const setClass = (el, base, extra) => {
    const cls = extra ? base + " " + extra : base;
    if (el.className !== cls) el.className = cls;
  };

  function loadFrame() {
    if (loading !== null || wanted === null || wanted === shown) return;
    const seq = wanted;
    loading = seq;
    const probe = new Image();
    probe.onload = () => { // the loaded picture replaces the shown one: no second request, no flicker
      probe.id = "frame";
      probe.alt = $("frame").alt;
      probe.dataset.seq = String(seq);
      $("frame").replaceWith(probe);
      shown = seq;
      loading = null;
      $("no-frame").classList.add("hidden");
      text("frame-seq", seq + (verdictOf.has(seq) ? " · " + verdictOf.get(seq).toUpperCase() : ""));
      loadFrame();
    };
    probe.onerror = () => { // gone from the server's few kept frames, or the service is away: try the newest
      loading = null;
      if (wanted !== seq) loadFrame();
      else setTimeout(loadFrame, 1000);
    };
    probe.src = "frame.jpg?seq=" + encodeURIComponent(seq);
  }

  function banner() {
    const b = $("banner");
    const lines = [];
    let lost = false;
    if (!connected) {
      lines.push("connection to the service lost: reconnecting…");
      lost = true;
    } else if (current) {
      const cam = current.camera || {};
      if (cam.state && !["streaming", "waiting_trigger", "connected"].includes(cam.state)) {
        lines.push(cam.state === "lost" ? "camera lost" + (cam.detail ? " (" + cam.detail + ")" : "") + ", reconnecting"
          : "camera " + cam.state + (cam.detail ? " (" + cam.detail + ")" : ""));
      }
      const br = current.broker || {};
      if (br.connected === false) {
        lines.push("broker unreachable" + (br.address ? " (" + br.address + ")" : "") +
          ": results queued on disk (" + (br.queue_depth ?? "?") + ")");
      }
      if (current.health && current.health.state === "failing") lost = true;
    }
    const msg = lines.join(" · ");
    if (b.textContent !== msg) b.textContent = msg;
    b.classList.toggle("hidden", !msg);
    b.classList.toggle("lost", lost);
    const verdict = $("verdict");
    verdict.classList.toggle("stale", !connected);
  }

  function render(ev) {
    current = ev;
    if (typeof ev.server_time === "number") clockOffset = ev.server_time - Date.now() / 1000;
    showAge();
    text("product", ev.product);
    text("bundle", ev.bundle_version);
    text("threshold", fmt(ev.threshold, 4));
    const v = $("verdict");
    if (ev.verdict) {
      text("verdict", ev.verdict.toUpperCase());
      setClass(v, "verdict", ev.verdict + (connected ? "" : " stale"));
    }
    v.dataset.seq = ev.seq === null || ev.seq === undefined ? "" : String(ev.seq);
    text("seq", ev.seq);
    text("frame-id", ev.frame_id);
    text("score", fmt(ev.score, 4));
    text("regions", ev.regions);
    text("inspected", ev.inspected);
    text("rejected", ev.rejected);
    text("errors", ev.errors);
    const w = ev.window || {};
    text("rate-label", "reject rate (last " + (w.n || 0) + ")");
    text("reject-rate", w.n ? (100 * w.rejected / w.n).toFixed(1) + " %" : "—");

    const h = ev.health || {};
    const hp = $("health");
    text("health", h.state);
    setClass(hp, "pill", h.state || "");
    const cam = ev.camera || {};
    const up = ["streaming", "waiting_trigger", "connected"].includes(cam.state);
    text("camera", cam.state ? (cam.name ? cam.name + ": " : "") + cam.state : null);
    setClass($("camera"), "pill", cam.state ? (up ? "ok" : cam.state === "lost" ? "down" : "warn") : "");
    const br = ev.broker || {};
    const bp = $("broker");
    bp.dataset.state = br.connected === true ? "up" : br.connected === false ? "down" : "";
    text("broker", br.connected === true ? "connected" : br.connected === false
      ? "unreachable · " + (br.queue_depth ?? "?") + " queued" : null);
    setClass(bp, "pill", br.connected === true ? "ok" : br.connected === false ? "down" : "");
    const reasons = $("reasons");
    const want = (h.reasons || []).join("\n");
    if (reasons.dataset.text !== want) {
      reasons.dataset.text = want;
      reasons.replaceChildren(...(h.reasons || []).map((r) => {
        const li = document.createElement("li");
        li.textContent = r;
        return li;
      }));
    }

    const rows = [];
    const stages = ev.stages_ms || {};
    for (const name of Object.keys(stages)) rows.push([name, stages[name].p50, stages[name].p99]);
    if (ev.end_to_end_ms) rows.push(["capture → result", ev.end_to_end_ms.p50, ev.end_to_end_ms.p99]);
    const body = $("latency-rows");
    const key = rows.map((r) => r[0] + fmt(r[1], 1) + fmt(r[2], 1)).join("|");
    if (body.dataset.key !== key) {
      body.dataset.key = key;
      body.replaceChildren(...rows.map((r) => {
        const tr = document.createElement("tr");
        for (const [i, val] of [r[0], fmt(r[1], 1), fmt(r[2], 1)].entries()) {
          const cell = document.createElement(i === 0 ? "th" : "td");
          cell.textContent = val;
          tr.appendChild(cell);
        }
        return tr;
      }));
    }
    text("clients", ev.clients);
    if (ev.frame !== null && ev.frame !== undefined) {
      verdictOf.set(ev.frame, ev.verdict || "");
      if (verdictOf.size > 20) verdictOf.delete(verdictOf.keys().next().value);
      wanted = ev.frame;
      loadFrame();
    }
    banner();
  }

  function setConnected(yes) {
    if (connected === yes) return;
    connected = yes;
    document.body.dataset.connected = yes ? "yes" : "no";
    text("conn", yes ? "live" : "connection to the service lost, reconnecting…");
    banner();
  }

  let source = null;
  function connect() {
    source = new EventSource("events");
    source.onopen = () => { lastEventAt = Date.now(); };
    source.onmessage = (msg) => {
      lastEventAt = Date.now();
      setConnected(true);
      let ev;
      try {
        ev = JSON.parse(msg.data);
      } catch (e) {
        return;
      }
      render(ev);
    };
    source.onerror = () => {
      setConnected(false);
      // a network error is retried by EventSource itself (retry: 2000); an HTTP error (503: too many pages
      // open) closes it for good, so open a new one a little later
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
    };
  }
  connect();
  setInterval(() => {
    showAge();
    if (connected && Date.now() - lastEventAt > STALE_MS) {
      setConnected(false);
      source.close(); // a silent link (e.g. a half-open TCP connection): start over
      connect();
    }
  }, 1000);
  document.body.dataset.connected = "no";
  banner();
})();
