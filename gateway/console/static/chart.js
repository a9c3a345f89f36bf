/* The overview's chart: conversions by status (stacked bars) and clicks (a line), per UTC day.
   Data come from the page's JSON data block (the stats API's answer), never from inline script. */
(function () {
  "use strict";
  var holder = document.getElementById("chart");
  var source = document.getElementById("chart-data");
  if (!holder || !source || typeof uPlot === "undefined") { return; }
  var data = JSON.parse(source.textContent);
  var statuses = [
    ["delivered", "Delivered", "#2e7d32"],
    ["failed", "Failed", "#c62828"],
    ["pending", "Pending", "#f9a825"],
    ["expired", "Expired", "#6d4c41"],
    ["dry_run", "Dry run", "#607d8b"],
  ];
  var xs = data.days.map(function (day) { return Date.parse(day + "T00:00:00Z") / 1000; });
  // Stack: each series is the sum of itself and the ones below it.
  var running = xs.map(function () { return 0; });
  var stacked = statuses.map(function (s) {
    running = running.map(function (v, i) { return v + data.statuses[s[0]][i]; });
    return running.slice();
  });
  var bars = uPlot.paths.bars({ size: [0.7, 40] });
  var series = [{ label: "Day (UTC)", value: "{YYYY}-{MM}-{DD}" }];
  var columns = [xs];
  // Drawn top of the stack first, so lower statuses paint over it.
  for (var i = statuses.length - 1; i >= 0; i--) {
    series.push({ label: statuses[i][1], fill: statuses[i][2], stroke: statuses[i][2], paths: bars, points: { show: false },
      value: (function (name) { return function (u, v, si, idx) { return idx == null ? "" : data.statuses[name][idx]; }; })(statuses[i][0]) });
    columns.push(stacked[i]);
  }
  series.push({ label: "Clicks", stroke: "#1565c0", width: 2, scale: "clicks" });
  columns.push(data.clicks);
  function size() { return { width: Math.max(280, holder.clientWidth), height: 260 }; }
  var plot = new uPlot(Object.assign(size(), {
    series: series,
    scales: { x: { time: true }, clicks: {} },
    axes: [{}, { label: "Conversions" }, { side: 1, scale: "clicks", label: "Clicks", grid: { show: false } }],
    legend: { live: true },
    tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
  }), columns, holder);
  window.addEventListener("resize", function () { plot.setSize(size()); });
})();
