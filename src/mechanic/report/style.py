"""The page's inline CSS (system fonts, no external resources) and the script that draws the plots."""

CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff; --accent:#2563eb;
  --good:#137333; --good-bg:#e6f4ea; --bad:#a50e0e; --bad-bg:#fce8e6; --warn:#8a5300; --warn-bg:#fef3c7; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.5; font-size:15px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1120px; margin:0 auto; padding:24px 20px 48px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px 24px; margin:0 0 20px;
  box-shadow:0 1px 2px rgba(15,23,42,.04); }
h1 { font-size:24px; margin:0; line-height:1.25; }
h2 { font-size:19px; margin:0 0 6px; }
h3 { font-size:15px; margin:22px 0 8px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
p { margin:8px 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size:13px; }
pre { white-space:pre-wrap; word-break:break-word; margin:4px 0 0; background:#f8fafc; border:1px solid var(--line);
  border-radius:6px; padding:8px 10px; }
.summary .head { display:flex; gap:16px; align-items:flex-start; justify-content:space-between; margin-bottom:12px; }
.summary .line { display:grid; grid-template-columns:90px 1fr; gap:8px; padding:4px 0; }
.what { display:inline-block; font-size:11px; font-weight:600; text-transform:uppercase; letter-spacing:.05em;
  color:var(--muted); margin-right:8px; }
.line .what { padding-top:3px; }
.badge { display:inline-block; padding:3px 12px; border-radius:999px; font-size:13px; font-weight:600; white-space:nowrap; }
.badge.good { background:var(--good-bg); color:var(--good); }
.badge.bad { background:var(--bad-bg); color:var(--bad); }
.badge.warn { background:var(--warn-bg); color:var(--warn); }
.badge.muted { background:#eef2f7; color:var(--muted); padding:1px 8px; font-weight:500; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit, minmax(170px, 1fr)); gap:12px; margin-top:16px; }
.tile { border:1px solid var(--line); border-radius:8px; padding:12px 14px; background:#fbfcfe; }
.tile .value { font-size:26px; font-weight:650; font-variant-numeric:tabular-nums; }
.tile .label { color:var(--muted); font-size:13px; }
.meta { color:var(--muted); font-size:13px; margin-bottom:6px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
thead th { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); font-weight:600; }
tr.group th { background:#f8fafc; font-size:12px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); }
table.eval td { white-space:nowrap; }
table.eval td.metric { white-space:normal; min-width:220px; }
.metric .name { font-weight:600; }
.metric .arrow { color:var(--muted); }
.desc { color:var(--muted); font-size:12.5px; }
.ci { color:var(--muted); font-size:12.5px; }
.mean { font-weight:600; }
.delta.better { background:var(--good-bg); color:var(--good); }
.delta.worse { background:var(--bad-bg); color:var(--bad); }
.delta.moved { background:var(--warn-bg); color:var(--warn); }
span.delta { padding:1px 6px; border-radius:4px; }
td.delta .ci { color:inherit; opacity:.8; }
.note { color:var(--muted); font-size:13px; }
figure { margin:18px 0 4px; }
figcaption { font-weight:600; margin-bottom:6px; }
.caption { color:var(--muted); font-size:13px; }
.plot { width:100%; min-height:200px; }
table.fig td.num { font-variant-numeric:tabular-nums; }
.pair { display:grid; grid-template-columns:repeat(auto-fit, minmax(260px, 1fr)); gap:12px; }
.sample { border-top:1px solid var(--line); padding:12px 0; }
.sample:first-of-type { border-top:0; }
.sample .prompt { margin-bottom:6px; }
details { margin:10px 0; }
summary { cursor:pointer; color:var(--accent); }
table.kv th { width:34%; font-weight:500; color:var(--muted); }
.artifacts ul { margin:6px 0; padding-left:20px; }
footer { color:var(--muted); font-size:12px; text-align:center; }
.contexts { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size:13px; }
.ctx { display:grid; grid-template-columns:64px 1fr; gap:8px; padding:3px 0; border-bottom:1px solid var(--line); }
.ctx-value { color:var(--muted); text-align:right; font-variant-numeric:tabular-nums; }
.ctx-text { white-space:pre-wrap; word-break:break-word; }
.tok { border-radius:2px; }
.tok.max { outline:1.5px solid #9a3412; }
.tok.unread { color:var(--muted); }
.tok-text { white-space:pre; }
.feature-links a { color:var(--accent); margin-right:6px; }
@media (max-width:640px) { main { padding:12px 8px; } .card { padding:14px; } .summary .line { grid-template-columns:1fr; } }
"""

# Draws every plot spec; body[data-plots-rendered] is set to their count once all Plotly.newPlot promises resolve.
RUNNER = """
(function () {
  var specs = JSON.parse(document.getElementById("plot-specs").textContent);
  var config = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
  var jobs = specs.map(function (spec, i) {
    return Plotly.newPlot(document.getElementById("plot-" + i), spec.data, spec.layout, config);
  });
  Promise.all(jobs).then(function () { document.body.dataset.plotsRendered = String(jobs.length); },
    function (e) { document.body.dataset.plotsError = String(e); console.error(e); });
})();
"""
