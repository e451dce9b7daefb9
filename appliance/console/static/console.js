// The console's own script: live updates over server-sent events. Everything that comes from the
// appliance is put into the page as text (textContent), never as markup.
(function () {
  "use strict";
  var page = document.body.dataset.page;

  function live(text, good) {
    var el = document.getElementById("live");
    if (el) { el.textContent = text; el.className = "live " + (good ? "good" : "bad"); }
  }

  function bytes(v) {
    if (v === null || v === undefined) return "";
    var units = ["B", "kB", "MB", "GB", "TB"], i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i ? v.toFixed(1) : v.toFixed(0)) + " " + units[i];
  }

  function duration(v) {
    if (v === null || v === undefined) return "—";
    v = Math.round(v);
    if (v < 120) return v + " s";
    if (v < 7200) return Math.round(v / 60) + " min";
    return (v / 3600).toFixed(1) + " h";
  }

  function format(el, v) {
    var kind = el.dataset.format;
    if (kind === "bytes") return bytes(v);
    if (kind === "duration") return duration(v);
    if (kind === "health") return v === true ? "ok" : v === false ? "down" : String(v);
    return v === null || v === undefined ? "—" : String(v);
  }

  function stream(url, handlers) {
    var source = new EventSource(url);
    source.onopen = function () { live("live", true); };
    source.onerror = function () { live("reconnecting…", false); };
    Object.keys(handlers).forEach(function (name) {
      source.addEventListener(name, function (e) { handlers[name](JSON.parse(e.data)); });
    });
    return source;
  }

  // -- Overview ---------------------------------------------------------------------------------
  function overview() {
    var rates = null, outbox = null, data = [[], [], []], depth = [[], []];
    function chart(id, series, values) {
      var el = document.getElementById(id);
      if (!el || !window.uPlot) return null;
      return new uPlot({ width: el.clientWidth || 400, height: 160, series: series, legend: { show: true },
                         axes: [{}, { size: 50 }] }, values, el);
    }
    function add(p) {
      data[0].push(p[0]); data[1].push(p[1]); data[2].push(p[2]);
      depth[0].push(p[0]); depth[1].push(p[3]);
      var cut = p[0] - 3600;
      while (data[0].length && data[0][0] < cut) { data.forEach(function (s) { s.shift(); }); depth.forEach(function (s) { s.shift(); }); }
    }
    fetch("/api/chart", { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (j) {
      j.points.forEach(add);
      rates = chart("chart-rates", [{}, { label: "accepted/s", stroke: "#17733a" }, { label: "rejected/s", stroke: "#b3261e" }], data);
      outbox = chart("chart-outbox", [{}, { label: "outbox", stroke: "#1f5fa8" }], depth);
    });
    stream("/events", {
      overview: function (o) {
        document.querySelectorAll("[data-field]").forEach(function (el) {
          var key = el.dataset.field;
          if (key === "error") { el.hidden = !o.error; el.textContent = o.error || ""; return; }
          if (key in o) el.textContent = format(el, o[key]);
        });
        document.body.dataset.updated = String(o.at);
        if (o.point) {
          add(o.point);
          document.body.dataset.points = String(data[0].length);
          if (rates) rates.setData(data);
          if (outbox) outbox.setData(depth);
        }
      }
    });
  }

  // -- Verdicts ---------------------------------------------------------------------------------
  function verdicts() {
    var body = document.getElementById("tail"), paused = false, held = [];
    var pause = document.getElementById("pause");
    pause.addEventListener("click", function () {
      paused = !paused;
      pause.textContent = paused ? "Resume" : "Pause";
      if (!paused) { held.forEach(insert); held = []; }
    });
    function cell(tr, text) { var td = document.createElement("td"); td.textContent = text || ""; tr.appendChild(td); }
    function insert(v) {
      var tr = document.createElement("tr");
      tr.className = v.verdict;
      tr.dataset.id = v.id;
      [v.ts, v.verdict, v.topic, v.client_id, v.schema, v.reason].forEach(function (t) { cell(tr, t); });
      tr.addEventListener("click", function () {
        htmx.ajax("GET", "/messages/" + encodeURIComponent(v.id), { target: "#detail", swap: "innerHTML" });
      });
      body.insertBefore(tr, body.firstChild);
      while (body.children.length > 300) body.removeChild(body.lastChild);
    }
    stream("/verdicts/stream" + window.location.search, {
      verdicts: function (rows) { rows.forEach(function (v) { if (paused) held.push(v); else insert(v); }); }
    });
  }

  // -- Quarantine: "select all" ---------------------------------------------------------------------
  document.addEventListener("change", function (e) {
    var box = e.target;
    if (box.matches && box.matches("[data-select-all]")) {
      box.closest("table").querySelectorAll("tbody input[type=checkbox]").forEach(function (c) { c.checked = box.checked; });
    }
  });

  if (page === "overview") overview();
  if (page === "verdicts") verdicts();
})();
