// strato dashboard: CSRF header on htmx requests, and the charts of an app's functions.
(function () {
  "use strict";
  var csrf = document.querySelector('meta[name="csrf-token"]');
  document.body.addEventListener("htmx:configRequest", function (e) {
    if (csrf) e.detail.headers["X-CSRF-Token"] = csrf.content;
  });

  // a log tail follows new lines while it is scrolled to the bottom
  var logs = document.getElementById("logs");
  if (logs) {
    logs.scrollTop = logs.scrollHeight;
    var stick = true;
    logs.addEventListener("scroll", function () {
      stick = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 8;
    });
    logs.addEventListener("htmx:afterSettle", function () {
      if (stick) logs.scrollTop = logs.scrollHeight;
    });
  }

  var charts = document.getElementById("charts");
  if (!charts || typeof uPlot === "undefined") return;
  var appId = charts.dataset.appId;
  var KINDS = {
    rate: { title: "calls/s and errors/s", series: [["calls", "calls/s", "#2a7ae2"], ["errors", "errors/s", "#d9534f"]] },
    latency: { title: "latency p50 / p99 (ms)", ms: true, series: [["p50", "p50", "#5cb85c"], ["p99", "p99", "#f0ad4e"]] },
    queue: { title: "inputs queued / running", series: [["queued", "queued", "#8e44ad"], ["running", "running", "#16a085"]] },
    containers: { title: "containers", series: [["containers", "containers", "#34495e"]] }
  };
  var plots = {};

  function opts(kind, width) {
    var k = KINDS[kind];
    return {
      title: k.title, width: width, height: 160,
      scales: { x: { time: true } },
      series: [{}].concat(k.series.map(function (s) { return { label: s[1], stroke: s[2], width: 2, spanGaps: true }; })),
      axes: [{}, { size: 50 }]
    };
  }

  function draw(data) {
    Object.keys(data).forEach(function (fid) {
      var s = data[fid];
      var section = charts.querySelector('[data-fn="' + fid + '"]');
      if (!section) return;
      section.querySelectorAll(".chart").forEach(function (el) {
        var kind = el.dataset.kind;
        var cols = [s.t].concat(KINDS[kind].series.map(function (x) {
          var col = s[x[0]];
          return KINDS[kind].ms ? col.map(function (v) { return v == null ? null : v * 1000; }) : col;
        }));
        var key = fid + "/" + kind;
        if (!plots[key]) {
          plots[key] = new uPlot(opts(kind, Math.max(260, el.clientWidth || 300)), cols, el);
        } else {
          plots[key].setData(cols);
        }
        el.dataset.points = String(s.t.length);
      });
    });
  }

  var source = new EventSource("/ui/sse/series?app=" + encodeURIComponent(appId));
  source.addEventListener("series", function (e) { draw(JSON.parse(e.data)); });
})();
